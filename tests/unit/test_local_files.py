"""The executor's local files (localfiles.py): a per-user cache directory, private, refused when
another user could read or swap what is in it; task files created new, 0600, never through a link."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import cloudpickle
import pytest
from covalent._shared_files.exceptions import TaskRuntimeError
from direct_executor import DirectExecutor

from covalent_gcpbatch_plugin import clients, localfiles, settings
from covalent_gcpbatch_plugin.errors import ConfigError
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor, Step
from covalent_gcpbatch_plugin.protocol import JobState, TaskObjects, make_job_id
from covalent_gcpbatch_plugin.task_objects import TaskStore, pickle_task
from covalent_gcpbatch_plugin.waiting import Outcome

NOBODY = 65534


class OfflineExecutor(DirectExecutor):
    """run() up to the upload, without a Covalent server or a bucket: the upload records the
    pickle it was given and stops the task there."""

    uploaded: list[Path]

    def _upload_task(self, objects, spec, workdir, task):
        path = pickle_task(workdir, task)
        self.uploaded.append(path)
        self.modes = (stat.S_IMODE(os.stat(path.parent).st_mode), stat.S_IMODE(os.stat(path).st_mode))
        raise RuntimeError("upload stopped by the test")

    async def _stop_job(self, job_id):
        pass

    def _retry(self, within=None):
        return clients.transient_retry(0.01)


def offline(cache_dir: str) -> OfflineExecutor:
    executor = OfflineExecutor(project_id="p", bucket_name="b", container_image_uri="i", cache_dir=cache_dir,
                               wait_mode="poll", pack_window=0, storage_emulator_host="http://127.0.0.1:9")
    executor.uploaded = []
    return executor


def run_task(executor: GCPBatchExecutor) -> TaskRuntimeError:
    metadata = {"dispatch_id": "0123abcd-0000-4000-8000-000000000000", "node_id": 0, "results_dir": "/nowhere"}
    with pytest.raises(TaskRuntimeError) as info:
        asyncio.run(executor.run(lambda: 1, [], {}, metadata))
    return info.value


def test_the_default_cache_dir_is_per_user_and_private(tmp_path, monkeypatch):
    """Not /tmp/covalent (shared by every user and other plugins): the user's own cache directory,
    XDG_CACHE_HOME honoured, created 0700."""
    assert settings.PLUGIN_DEFAULTS["cache_dir"] == ""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert localfiles.private_dir("") == tmp_path / "xdg" / "covalent-gcpbatch" / "tasks"
    assert stat.S_IMODE(os.stat(tmp_path / "xdg" / "covalent-gcpbatch" / "tasks").st_mode) == 0o700
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert localfiles.default_cache_dir() == tmp_path / "home" / ".cache" / "covalent-gcpbatch" / "tasks"

    executor = offline("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    run_task(executor)
    (pickle,) = executor.uploaded
    assert pickle.parent.parent == tmp_path / "xdg2" / "covalent-gcpbatch" / "tasks"
    assert not str(pickle).startswith("/tmp/covalent/")


@pytest.mark.parametrize("how, fragment", [
    ("world-writable", "is writable by its group or by others (mode 0777)"),
    ("group-writable", "is writable by its group or by others (mode 0770)"),
    ("another user's", f"is owned by uid {NOBODY}, not by this user"),
    ("a symbolic link", "is a symbolic link"),
])
def test_a_cache_dir_others_could_write_fails_the_task_before_anything_is_written(tmp_path, how, fragment):
    """Another user who made the directory first (or may write in it) could swap a task's directory
    for a link, read the result or plant a pickle: the task fails at once, naming the directory
    and the fix, and writes nothing there."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "world-writable":
        cache.chmod(0o777)
    elif how == "group-writable":
        cache.chmod(0o770)
    elif how == "another user's":
        cache.chmod(0o700)
        os.chown(cache, NOBODY, NOBODY)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        cache.rmdir()
        cache.symlink_to(tmp_path / "elsewhere")
    executor = offline(str(cache))
    message = str(run_task(executor))
    assert f"cache_dir {str(cache)!r} {fragment}" in message, message
    assert "Set cache_dir to a directory only you can write" in message
    assert executor.uploaded == [] and list(cache.iterdir()) == []


def test_a_private_cache_dir_of_ones_own_is_used(tmp_path):
    cache = tmp_path / "mine"
    cache.mkdir(mode=0o755)  # readable by others is fine: the task directories and files are not
    executor = offline(str(cache))
    message = str(run_task(executor))
    assert "upload stopped by the test" in message
    (pickle,) = executor.uploaded
    assert pickle.parent.parent == cache
    assert executor.modes == (0o700, 0o600)
    assert list(cache.iterdir()) == [], "the task's directory is removed with the task"


def test_a_symlinked_task_directory_is_refused_for_the_task_pickle(tmp_path):
    """A task directory swapped for a link to someone else's directory: the pickle is not written
    there (where its owner could read it, or replace it before the upload)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    workdir = tmp_path / "cache" / "cov-0123abcd-0-aaaaaaaa"
    workdir.parent.mkdir(mode=0o700)
    workdir.symlink_to(theirs)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        pickle_task(workdir, (lambda: 1, [], {}))
    assert list(theirs.iterdir()) == []


def test_a_planted_task_pickle_is_not_overwritten_or_followed(tmp_path):
    workdir = tmp_path / "cov-0123abcd-0-aaaaaaaa"
    workdir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (workdir / "task.pkl").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot be created as a new private file"):
        pickle_task(workdir, (lambda: 1, [], {}))
    assert victim.read_bytes() == b"keep"


def test_the_task_pickle_is_private(tmp_path):
    path = pickle_task(tmp_path / "cov-0123abcd-0-aaaaaaaa", (len, ["ab"], {}))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    function, args, kwargs = cloudpickle.loads(path.read_bytes())
    assert function(*args, **kwargs) == 2


class Blob:
    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data = name, data

    def download_to_file(self, f, **_):
        f.write(self.data)

    def download_to_filename(self, filename, **_):
        with open(filename, "wb") as f:
            f.write(self.data)

    def download_as_bytes(self, **_):
        return self.data


class Bucket:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = {name: Blob(name, data) for name, data in blobs.items()}

    def list_blobs(self, prefix: str, **_):
        return [blob for name, blob in self.blobs.items() if name.startswith(prefix)]

    def get_blob(self, name: str, **_):
        return self.blobs.get(name)


def collect(workdir: Path, result=42):
    job_id = make_job_id("0123abcd-0000-4000-8000-000000000000", 0, "aaaaaaaa")
    objects = TaskObjects(job_id)
    executor = GCPBatchExecutor(project_id="p", bucket_name="b", container_image_uri="i")
    bucket = Bucket({objects.result: cloudpickle.dumps(result)})
    executor._store = lambda: TaskStore(data=bucket, tasks=bucket, retry=executor._retry)
    return executor._collect(job_id, objects, Outcome(JobState.SUCCEEDED), workdir, Step("reading"))


def test_the_result_is_read_from_a_private_file(tmp_path):
    assert collect(tmp_path / "cov-task") == 42
    assert stat.S_IMODE(os.stat(tmp_path / "cov-task").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cov-task" / "result.pkl").st_mode) == 0o600


def test_a_symlinked_task_directory_is_refused_for_the_result(tmp_path):
    """The result is never written where someone else can read it (or swap it before it is
    unpickled)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    workdir = tmp_path / "cov-task"
    workdir.symlink_to(theirs)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        collect(workdir)
    assert list(theirs.iterdir()) == []


def test_a_planted_result_file_is_not_followed_or_read(tmp_path):
    workdir = tmp_path / "cov-task"
    workdir.mkdir(mode=0o700)
    planted = tmp_path / "planted.pkl"
    planted.write_bytes(cloudpickle.dumps("planted"))
    (workdir / "result.pkl").symlink_to(planted)
    with pytest.raises(ConfigError, match="cannot be created as a new private file"):
        collect(workdir)
    assert cloudpickle.loads(planted.read_bytes()) == "planted"


def test_a_task_directory_of_another_user_is_refused(tmp_path):
    workdir = tmp_path / "cov-task"
    workdir.mkdir(mode=0o700)
    os.chown(workdir, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        collect(workdir)
