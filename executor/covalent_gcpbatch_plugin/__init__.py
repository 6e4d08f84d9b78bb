"""Covalent executor for Google Cloud Batch, event-driven.

Kept import-free on purpose: the Cloud Function imports ``protocol``/``deployment``/``jobs``/
``clients``/``errors`` from this package (see functions/), and must not pull in Covalent. Covalent loads the executor from the
``gcpbatch`` module through the ``covalent.executor.executor_plugins`` entry point.
"""


def __getattr__(name: str) -> str:
    # The version is declared once, in pyproject.toml; read back from the installed metadata, on
    # first use only (the Cloud Function carries this file without the package's metadata).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("covalent-gcpbatch-plugin")
        except PackageNotFoundError:
            return "unknown"
    if name == "volume_path":  # covalent_gcpbatch_plugin.volume_path("/mnt/data/..."): volumes.py
        from .volumes import volume_path

        return volume_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
