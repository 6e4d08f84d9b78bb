"""What a Compute Engine machine type brings (vCPUs, memory, attached GPUs), read from its name.

The Cloud Function checks a task's ``machine_type`` against the deployment's caps with this, so a
named machine type cannot bring more than ``vcpus``/``memory``/``accelerator_count`` may ask for
(``a3-highgpu-8g`` is 208 vCPUs and 8 H100s whatever ``vcpus=1`` says). Standard library only: the
function imports it (``functions/`` links it) and it must stay importable anywhere the package is.

Why a table of Compute Engine's documented naming rather than the Compute Engine API
(``machineTypes.get``, one cached call per type, or the region's list recorded at deploy time):

- the function's account would need ``compute.machineTypes.get`` (a role it does not have today),
  and each new type would cost a Compute Engine call on the create path, which fails when that API
  throttles or is down; a list recorded at deploy time is per zone (machine types are zonal), large
  (hundreds of entries per zone) and stale as soon as Google adds a type, and the function's
  environment (where the caps live) is no place for it;
- the names are a documented contract: a predefined type is ``<series>-<class>-<vCPUs>`` with a
  fixed memory per vCPU for the class, a custom type carries its vCPUs and MiB in its name, and the
  accelerator-optimized types have a fixed shape each; nothing here needs the network, and the
  local stack (which has no Compute Engine) checks exactly what the cloud deployment checks.

The cost is that a type not in this table is unknown, and an unknown type is refused when caps
apply (``deployment.DeploymentSettings.check``) unless the deployer allowed it by name
(``--allowed-machine-types``). Each figure below names its source; a series whose figures could not
be confirmed from one is left out on purpose (C3, C3D, C4, N4, H3, Z3, A4X, G4, TPU hosts...).

Sources:
  [API]  the Compute Engine API's ``machineTypes`` list (``guestCpus``, ``memoryMb``) of one zone,
         recorded in GoogleCloudPlatform/deploystack ``tui/mock.go`` (2023);
  [CAT]  skypilot-org/skypilot-catalog ``catalogs/v8/gcp/vms.csv`` (vCPUs, GiB; fetched from the
         Compute Engine API by its maintainers) for the series newer than [API];
  [GPU]  GoogleCloudPlatform/cluster-toolkit ``modules/internal/gpu-definition/main.tf`` (the GPUs
         each accelerator-optimized type comes with), and Compute Engine's naming of the A series:
         ``<series>-<class>-<N>g`` carries N GPUs (https://cloud.google.com/compute/docs/gpus);
  [CUS]  custom machine types, ``custom-<vCPUs>-<MiB>`` (N1) and ``<series>-custom-<vCPUs>-<MiB>``
         (E2, N2, N2D), ``-ext`` for extended memory
         (https://cloud.google.com/compute/docs/instances/creating-instance-with-custom-machine-type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024  # MiB: Compute Engine's "GB" of memory in its machine type tables is GiB (memoryMb = GB x 1024)


@dataclass(frozen=True)
class MachineShape:
    """What one VM of a machine type has: ``vcpus`` as the API's ``guestCpus`` (a shared-core type
    counts its 1 or 2 guest CPUs), ``memory_mb`` in MiB as its ``memoryMb``, ``gpus`` attached."""

    vcpus: int
    memory_mb: int
    gpus: int = 0


#: Predefined ``<series>-<class>-<vCPUs>``: MiB per vCPU, and the vCPU counts that exist. [API]
#: (every size below is in its recorded list, with exactly this memory).
_PREDEFINED: dict[tuple[str, str], tuple[float, frozenset[int]]] = {
    ("e2", "standard"): (4 * GIB, frozenset({2, 4, 8, 16, 32})),
    ("e2", "highmem"): (8 * GIB, frozenset({2, 4, 8, 16})),
    ("e2", "highcpu"): (1 * GIB, frozenset({2, 4, 8, 16, 32})),
    ("n1", "standard"): (3.75 * GIB, frozenset({1, 2, 4, 8, 16, 32, 64, 96})),
    ("n1", "highmem"): (6.5 * GIB, frozenset({2, 4, 8, 16, 32, 64, 96})),
    ("n1", "highcpu"): (0.9 * GIB, frozenset({2, 4, 8, 16, 32, 64, 96})),  # memoryMb rounded: n1-highcpu-96 = 88474
    ("n2", "standard"): (4 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96, 128})),
    ("n2", "highmem"): (8 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96})),  # n2-highmem-128: _FIXED
    ("n2", "highcpu"): (1 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96})),
    ("n2d", "standard"): (4 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96, 128, 224})),
    ("n2d", "highmem"): (8 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96})),
    ("n2d", "highcpu"): (1 * GIB, frozenset({2, 4, 8, 16, 32, 48, 64, 80, 96, 128, 224})),
    ("c2", "standard"): (4 * GIB, frozenset({4, 8, 16, 30, 60})),
    ("c2d", "standard"): (4 * GIB, frozenset({2, 4, 8, 16, 32, 56, 112})),
    ("c2d", "highmem"): (8 * GIB, frozenset({2, 4, 8, 16, 32, 56, 112})),
    ("c2d", "highcpu"): (2 * GIB, frozenset({2, 4, 8, 16, 32, 56, 112})),
    ("t2d", "standard"): (4 * GIB, frozenset({1, 2, 4, 8, 16, 32, 48, 60})),
    ("t2a", "standard"): (4 * GIB, frozenset({1, 2, 4, 8, 16, 32, 48})),
}

#: L4 GPUs of each G2 size: not in the name, and not proportional (g2-standard-32 has 1). [GPU]
#: Its memory is 4 GiB per vCPU (g2-standard-4: 16 GiB ... g2-standard-96: 384 GiB).
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 24: 2, 32: 1, 48: 4, 96: 8}

#: Types whose shape is not a per-vCPU ratio: shared-core, memory-optimized, accelerator-optimized.
_FIXED: dict[str, MachineShape] = {
    # Shared-core [API]: guestCpus as the API reports them (e2-micro is 2 vCPUs at a 25% share).
    "e2-micro": MachineShape(2, 1024),
    "e2-small": MachineShape(2, 2048),
    "e2-medium": MachineShape(2, 4096),
    "f1-micro": MachineShape(1, 614),
    "g1-small": MachineShape(1, 1740),
    "n2-highmem-128": MachineShape(128, 884736),  # [API]: 864 GiB, not 8 per vCPU
    # Memory-optimized [API].
    "m1-megamem-96": MachineShape(96, 1468006),
    "m1-ultramem-40": MachineShape(40, 984064),
    "m1-ultramem-80": MachineShape(80, 1968128),
    "m1-ultramem-160": MachineShape(160, 3936256),
    "m2-ultramem-208": MachineShape(208, 6029312),
    "m2-megamem-416": MachineShape(416, 6029312),
    "m2-ultramem-416": MachineShape(416, 12058624),
    "m2-hypermem-416": MachineShape(416, 9043968),
    "m3-ultramem-32": MachineShape(32, 999424),
    "m3-megamem-64": MachineShape(64, 999424),
    "m3-ultramem-64": MachineShape(64, 1998848),
    "m3-megamem-128": MachineShape(128, 1998848),
    "m3-ultramem-128": MachineShape(128, 3997696),
    # A2, A100 40GB: vCPUs and memory [API], GPUs [GPU].
    "a2-highgpu-1g": MachineShape(12, 87040, 1),
    "a2-highgpu-2g": MachineShape(24, 174080, 2),
    "a2-highgpu-4g": MachineShape(48, 348160, 4),
    "a2-highgpu-8g": MachineShape(96, 696320, 8),
    "a2-megagpu-16g": MachineShape(96, 1392640, 16),
    # A2 Ultra, A100 80GB: [CAT] (12/24/48/96 vCPUs, 170/340/680/1360 GiB), GPUs [GPU].
    "a2-ultragpu-1g": MachineShape(12, 170 * GIB, 1),
    "a2-ultragpu-2g": MachineShape(24, 340 * GIB, 2),
    "a2-ultragpu-4g": MachineShape(48, 680 * GIB, 4),
    "a2-ultragpu-8g": MachineShape(96, 1360 * GIB, 8),
    # A3 High, H100 80GB: [CAT] (26 vCPUs and 234 GiB per GPU), GPUs [GPU] (8g listed; 1g/2g/4g by name).
    "a3-highgpu-1g": MachineShape(26, 234 * GIB, 1),
    "a3-highgpu-2g": MachineShape(52, 468 * GIB, 2),
    "a3-highgpu-4g": MachineShape(104, 936 * GIB, 4),
    "a3-highgpu-8g": MachineShape(208, 1872 * GIB, 8),
    # A3 Mega and A3 Edge (H100), A3 Ultra (H200), A4 (B200): [CAT], GPUs [GPU] (edge and a4 by name).
    "a3-megagpu-8g": MachineShape(208, 1872 * GIB, 8),
    "a3-edgegpu-8g": MachineShape(208, 1872 * GIB, 8),
    "a3-edgegpu-8g-nolssd": MachineShape(208, 1872 * GIB, 8),
    "a3-ultragpu-8g": MachineShape(224, 2952 * GIB, 8),
    "a3-ultragpu-8g-nolssd": MachineShape(224, 2952 * GIB, 8),
    "a4-highgpu-8g": MachineShape(224, 3968 * GIB, 8),
    # G2, L4: N vCPUs, 4 GiB per vCPU, GPUs per _G2_GPUS.
    **{f"g2-standard-{n}": MachineShape(n, n * 4 * GIB, gpus) for n, gpus in _G2_GPUS.items()},
}

_PREDEFINED_NAME = re.compile(r"(?P<series>[a-z][a-z0-9]*)-(?P<cls>standard|highmem|highcpu)-(?P<vcpus>[1-9][0-9]*)")
#: Custom types of N1 (no prefix), E2, N2 and N2D carry their vCPUs and MiB in their names. [CUS]
_CUSTOM_NAME = re.compile(r"(?:(?P<series>e2|n2|n2d)-)?custom-(?P<vcpus>[1-9][0-9]*)-(?P<mib>[1-9][0-9]*)(?:-ext)?")


def shape_of(machine_type: str) -> MachineShape | None:
    """The shape of ``machine_type``, or None if this table does not know it (then nothing can be
    said of its vCPUs, memory or GPUs: the caller refuses it, or trusts the deployer's allowlist)."""
    if machine_type in _FIXED:
        return _FIXED[machine_type]
    custom = _CUSTOM_NAME.fullmatch(machine_type)
    if custom:
        # Custom types have no GPUs of their own (N1's are attached with accelerator_count).
        return MachineShape(int(custom["vcpus"]), int(custom["mib"]))
    predefined = _PREDEFINED_NAME.fullmatch(machine_type)
    if predefined:
        entry = _PREDEFINED.get((predefined["series"], predefined["cls"]))
        vcpus = int(predefined["vcpus"])
        if entry and vcpus in entry[1]:
            return MachineShape(vcpus, round(vcpus * entry[0]))
    return None


def known_examples() -> str:
    """A few names this table knows, for error messages."""
    return "n2-standard-8, e2-highmem-4, c2d-highcpu-16, g2-standard-4, a2-highgpu-1g, n2-custom-8-32768"
