"""The executor's local files: a private cache directory, and files created there exclusively.

A task's pickle is the user's code and data, and its result is unpickled by the Covalent server:
whoever can read them or swap them on local disk reads the user's data or runs code as the server.
So the cache directory (``cache_dir``; by default per user: ``$XDG_CACHE_HOME/covalent-gcpbatch/tasks``,
else ``~/.cache/covalent-gcpbatch/tasks``) is created ``0700`` and refused when it is a symbolic
link, not the user's own, or writable by group or others; each task's directory below it is the
user's own directory (never a link), and each file is created new (``O_EXCL``), ``0600``, through
the directory's descriptor and never through a symbolic link (``O_NOFOLLOW``).

Standard library only: the worker image imports the executor module (``import covalent`` loads it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

#: Below the user's cache directory (beside local/ and worker-envs/ of the local stack).
CACHE_SUBDIR = Path("covalent-gcpbatch") / "tasks"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/covalent-gcpbatch/tasks``, or ``~/.cache/...`` (XDG: a relative
    ``XDG_CACHE_HOME`` is invalid and ignored), of the user the executor runs as."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / CACHE_SUBDIR


def _problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir(configured: str) -> Path:
    """The cache directory (``configured``, or the per-user default when empty), created ``0700``
    if missing; ConfigError if it is not private to this user."""
    path = Path(configured).expanduser() if configured else default_cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as err:
        raise ConfigError(f"cache_dir {str(path)!r} cannot be created ({err.strerror}): set cache_dir to a directory "
                          f"of yours, or leave it empty for the per-user default ({default_cache_dir()})") from None
    problem = _problem(os.lstat(path))
    if problem is not None:
        raise ConfigError(
            f"cache_dir {str(path)!r} {problem}: another user could read or replace the task and result pickles "
            f"there. Set cache_dir to a directory only you can write (empty: the per-user default "
            f"{default_cache_dir()}), or make this one yours with mode 0700")
    return path


def task_dir(path: Path) -> Path:
    """A task's directory in the (private) cache directory: created ``0700``, or, if it exists,
    this user's own directory and not a symbolic link; ConfigError otherwise."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        problem = _problem(os.lstat(path))
        if problem is not None:
            raise ConfigError(f"the task directory {str(path)!r} {problem}: refused (its pickles would be readable or "
                              "replaceable by someone else)") from None
    return path


def create_file(directory: Path, name: str) -> BinaryIO:
    """A new file ``name`` in the task directory ``directory``, open for writing and reading,
    ``0600``: created exclusively (not an existing file), never through a symbolic link (neither
    the file nor the directory may be one)."""
    task_dir(directory)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"the task directory {str(directory)!r} cannot be opened safely ({err.strerror}): "
                          "refused") from None
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as err:
        why = "it exists already" if err.errno == errno.EEXIST else err.strerror
        raise ConfigError(f"{str(directory / name)!r} cannot be created as a new private file ({why}): refused") from None
    finally:
        os.close(dir_fd)
    return os.fdopen(fd, "w+b")
