"""A GCS bucket in memory, for the unit tests of what reads a bucket (watch.py)."""

from __future__ import annotations


class FakeBlob:
    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data = name, data

    def download_as_bytes(self, **_) -> bytes:
        return self.data

    def download_as_text(self, **_) -> str:
        return self.data.decode()


class FakeBucket:
    """A bucket holding ``objects`` (name -> bytes): listings honour prefix and offsets, as GCS's do."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_blobs(self, prefix: str = "", start_offset: str | None = None, end_offset: str | None = None, **_):
        return [FakeBlob(n, d) for n, d in sorted(self.objects.items()) if n.startswith(prefix)
                and (not start_offset or n >= start_offset) and (not end_offset or n < end_offset)]

    def get_blob(self, name: str, **_):
        return FakeBlob(name, self.objects[name]) if name in self.objects else None

    def blob(self, name: str):
        return self.get_blob(name)
