"""machine_types: what a machine type's name says it brings (vCPUs, MiB, GPUs), each row from the
sources named in the module (the Compute Engine API's recorded list, the catalogue, the GPU table)."""

from __future__ import annotations

import pytest

from covalent_gcpbatch_plugin.machine_types import MachineShape, shape_of

GIB = 1024


@pytest.mark.parametrize(
    "name, vcpus, memory_mb, gpus",
    [
        # predefined, memory per vCPU by class (values as the API's memoryMb)
        ("e2-standard-2", 2, 8192, 0),
        ("e2-standard-32", 32, 131072, 0),
        ("e2-highmem-16", 16, 131072, 0),
        ("e2-highcpu-8", 8, 8192, 0),
        ("n1-standard-1", 1, 3840, 0),
        ("n1-standard-96", 96, 368640, 0),
        ("n1-highmem-2", 2, 13312, 0),
        ("n1-highcpu-2", 2, 1843, 0),
        ("n1-highcpu-96", 96, 88474, 0),
        ("n2-standard-128", 128, 524288, 0),
        ("n2-highmem-96", 96, 786432, 0),
        ("n2-highmem-128", 128, 884736, 0),  # 864 GiB: not the class's 8 GiB per vCPU
        ("n2-highcpu-96", 96, 98304, 0),
        ("n2d-standard-224", 224, 917504, 0),
        ("n2d-highcpu-224", 224, 229376, 0),
        ("c2-standard-30", 30, 122880, 0),
        ("c2d-highcpu-112", 112, 229376, 0),
        ("c2d-highmem-56", 56, 458752, 0),
        ("t2d-standard-60", 60, 245760, 0),
        # shared-core: the API's guestCpus
        ("e2-micro", 2, 1024, 0),
        ("e2-medium", 2, 4096, 0),
        ("f1-micro", 1, 614, 0),
        ("g1-small", 1, 1740, 0),
        # memory-optimized
        ("m1-ultramem-160", 160, 3936256, 0),
        ("m3-megamem-128", 128, 1998848, 0),
        # custom: vCPUs and MiB in the name
        ("custom-4-8192", 4, 8192, 0),
        ("n2-custom-8-32768", 8, 32768, 0),
        ("n2d-custom-2-20480-ext", 2, 20480, 0),
        ("e2-custom-4-6144", 4, 6144, 0),
        # accelerator-optimized: their GPUs come with them
        ("a2-highgpu-1g", 12, 87040, 1),
        ("a2-megagpu-16g", 96, 1392640, 16),
        ("a2-ultragpu-8g", 96, 1360 * GIB, 8),
        ("a3-highgpu-1g", 26, 234 * GIB, 1),
        ("a3-highgpu-8g", 208, 1872 * GIB, 8),
        ("a3-megagpu-8g", 208, 1872 * GIB, 8),
        ("a3-edgegpu-8g", 208, 1872 * GIB, 8),
        ("a3-ultragpu-8g", 224, 2952 * GIB, 8),
        ("a4-highgpu-8g", 224, 3968 * GIB, 8),
        ("g2-standard-4", 4, 16 * GIB, 1),
        ("g2-standard-24", 24, 96 * GIB, 2),
        ("g2-standard-32", 32, 128 * GIB, 1),  # not proportional: one L4
        ("g2-standard-48", 48, 192 * GIB, 4),
        ("g2-standard-96", 96, 384 * GIB, 8),
    ],
)
def test_a_known_machine_type_has_its_documented_shape(name, vcpus, memory_mb, gpus):
    assert shape_of(name) == MachineShape(vcpus, memory_mb, gpus)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "n2-standard-3",  # no such size
        "n2-standard-0",
        "e2-highmem-32",  # E2 highmem stops at 16
        "n1-highcpu-1",
        "g2-standard-64",
        "a3-highgpu-16g",
        "c3-standard-8",  # a series whose figures are not in the sources: left out, refused
        "c4-standard-8",
        "n4-standard-8",
        "z3-highmem-88",
        "ct5lp-hightpu-4t",
        "c2-custom-4-8192",  # custom types exist for N1, E2, N2, N2D only
        "custom-4",
        "n2-standard-8-foo",
        "N2-standard-8",
    ],
)
def test_an_unknown_machine_type_has_no_shape(name):
    assert shape_of(name) is None
