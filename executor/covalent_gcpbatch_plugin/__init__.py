"""Covalent executor for Google Cloud Batch, event-driven.

Kept import-free on purpose: the Cloud Function imports ``protocol``/``deployment``/``jobs``/
``clients``/``errors`` from this package (see functions/), and must not pull in Covalent. Covalent loads the executor from the
``gcpbatch`` module through the ``covalent.executor.executor_plugins`` entry point.
"""

__version__ = "0.1.0"
