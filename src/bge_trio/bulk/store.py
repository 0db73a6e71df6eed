"""Where a bulk job reads and writes: a local path or an object store (``s3://``, ``gs://``).

pyarrow's filesystems do the work: a URI with a scheme is opened with
``pyarrow.fs.FileSystem.from_uri`` (S3 takes its credentials and region from the
standard ``AWS_*`` environment variables and profiles; ``AWS_ENDPOINT_URL`` or
``?endpoint_override=host:port&scheme=http`` in the URI points it at an S3-compatible
store), anything else is a local path.

A part or a manifest must be whole or absent. On a local filesystem the bytes go to
a hidden temporary name, are flushed to disk and renamed. On an object store a rename
is a copy and a delete, not atomic, but an object is: it appears whole when its upload
completes or not at all. So the bytes are built in memory and put once, under the
final name.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import attrs
import pyarrow.fs as pafs

LINES_BLOCK = 1 << 20
PARTIAL_PREFIX = "."  # hidden names: Parquet dataset readers skip them
PARTIAL_SUFFIX = ".partial"


@attrs.frozen
class Location:
    """A file or directory: ``uri`` as given, less its options (for messages and the
    manifest), ``path`` inside ``fs``; ``spec`` opens it again in another process."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str
    options: str = ""  # "?endpoint_override=..." as given

    @property
    def spec(self) -> str:
        return self.uri + self.options

    @classmethod
    def parse(cls, where: str) -> Location:
        if "://" not in where:
            path = os.path.abspath(where)
            return cls(pafs.LocalFileSystem(), path, path)
        try:
            fs, path = pafs.FileSystem.from_uri(where)
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot open {where} ({exc})") from None
        uri, query, options = where.partition("?")
        return cls(fs, path.rstrip("/"), uri.rstrip("/"), query + options)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Location:
        return attrs.evolve(self, path=f"{self.path}/{name}", uri=f"{self.uri}/{name}")

    def info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self.info().type != pafs.FileType.NotFound)

    def size(self) -> int:
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.uri)
        return int(info.size)

    def names(self) -> list[str]:
        """The entries directly under this directory (none if it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    def open_stream(self) -> Any:
        return self.fs.open_input_stream(self.path)

    def open_file(self) -> Any:
        """Random access (Parquet's footer, a fingerprint's last MiB)."""
        return self.fs.open_input_file(self.path)

    def lines(self) -> Iterator[bytes]:
        """The file's lines, read a block at a time (object stores' streams have no
        ``readline``). Opened before the first line is asked for: an OSError comes at
        the call, not later."""
        stream = self.open_stream()

        def read() -> Iterator[bytes]:
            with stream:
                rest = b""
                while block := stream.read(LINES_BLOCK):
                    *whole, rest = (rest + block).split(b"\n")
                    yield from whole
                if rest:
                    yield rest

        return read()

    def read_bytes(self) -> bytes:
        with self.open_stream() as f:
            return bytes(f.read())

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_whole(self, data: bytes) -> None:
        """Write ``data`` so that readers see the old state or all of it, never a part."""
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:  # one object, put once
                f.write(data)
            return
        parent, name = os.path.split(self.path)
        partial = os.path.join(parent, PARTIAL_PREFIX + name + PARTIAL_SUFFIX)
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)
