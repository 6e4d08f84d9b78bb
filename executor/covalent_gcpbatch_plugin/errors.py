"""Every error this plugin raises on purpose, in one place (as Covalent keeps its own in
``covalent._shared_files.exceptions``). Each message names the problem and the fix.

Standard library only: the Cloud Function imports this module too (``functions/`` links it).
Errors of a task itself reach Covalent as its ``TaskRuntimeError``/``TaskCancelledError``.
"""

from __future__ import annotations


class GCPBatchError(Exception):
    """Base class of the plugin's errors."""


class ConfigError(GCPBatchError, ValueError):
    """A GCPBatchExecutor setting is invalid or missing; the message names the key and what is accepted."""


class SpecError(GCPBatchError, ValueError):
    """An uploaded object's spec is missing, malformed, or outside what the deployment allows."""


class FunctionNotConfigured(GCPBatchError, RuntimeError):
    """The Cloud Function's environment lacks a deployment setting (deploy.sh sets them all)."""


class SubscribeError(GCPBatchError, RuntimeError):
    """The job notifications cannot be subscribed to; the message names the topic and the fix."""


class WorkerError(GCPBatchError):
    """The worker could not run the task (as opposed to: the task ran and raised)."""


class StackError(GCPBatchError, RuntimeError):
    """The local stack cannot be brought up (or found); the message says which component and where its log is."""


class CovalentServerError(GCPBatchError, RuntimeError):
    """The local Covalent server could not be started or stopped."""


class DeployError(GCPBatchError):
    """A deploy.sh helper command cannot do what was asked; the message says why."""
