"""``_manifest.json``: which parts of a job are written, and what job they belong to.

Written whole after each part (see :mod:`bge_trio.bulk.store`), so it never names a part
that is not there; a part written but not yet recorded (the job died between the two)
is written again under the same name by the next run. Its identity (the input, a
fingerprint of it, the columns, outputs, shard size, model and the settings that shape
the vectors) must match for a rerun to resume: a job that differs is refused rather than
mixed into the same directory. The same file serves a local job and a Ray job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bge_trio.bulk.parts import ShardDone
from bge_trio.bulk.rows import IdType, InputError
from bge_trio.bulk.store import Location

MANIFEST = "_manifest.json"  # "_" and "." names are skipped by Parquet dataset readers


class Manifest:
    def __init__(self, location: Location, value: dict[str, Any]) -> None:
        self._location = location
        self.value = value

    @classmethod
    def open(cls, output: Location, identity: dict[str, Any]) -> Manifest:
        """The output's manifest: an earlier run of the same job to resume, or a new one."""
        location = output.child(MANIFEST)
        try:
            found = location.exists()
            text = location.read_bytes() if found else None
        except OSError as exc:
            raise InputError(f"{location.uri}: cannot read it ({exc})") from None
        if text is not None:
            try:
                value: dict[str, Any] = json.loads(text)
            except ValueError as exc:
                raise InputError(f"{location.uri}: unreadable manifest ({exc})") from None
            differs = [key for key, want in identity.items() if value.get(key) != want]
            if differs:
                raise InputError(
                    f"{output.uri} holds another job (its {', '.join(differs)} differ); "
                    "use a new output directory to start over"
                )
            return cls(location, value)
        try:
            if output.names():
                raise InputError(
                    f"{output.uri} is not empty and has no {MANIFEST}; use a new directory"
                )
            output.make_dirs()
        except OSError as exc:
            raise InputError(f"{output.uri}: cannot write there ({exc})") from None
        manifest = cls(location, {**identity, "done": {}})
        manifest.save()
        return manifest

    @property
    def done(self) -> dict[str, Any]:
        parts: dict[str, Any] = self.value["done"]
        return parts

    @property
    def id_type(self) -> IdType | None:
        found: IdType | None = self.value.get("id_type")
        return found

    def started(self, id_type: IdType, model: dict[str, Any], memory: dict[str, Any]) -> None:
        """The run that embeds from now: the id type (decided once per job), and the model
        and memory plan (of the run that last embedded)."""
        self.value.setdefault("id_type", id_type)
        self.value["model"] = model
        self.value["memory"] = memory
        self.save()

    def record(self, part: ShardDone) -> None:
        self.done[part.name] = {
            "rows": part.rows,
            "failed": len(part.failed),
            "tokens": part.tokens,
        }
        self.save()

    def save(self) -> None:
        data = json.dumps(self.value, indent=1, default=str).encode()
        self._location.write_whole(data)


def fingerprint(path: Location) -> str:
    """Size and a hash of the first and last MiB: a changed input is noticed cheaply."""
    try:
        size = path.size()
        digest = hashlib.sha256(str(size).encode())
        with path.open_file() as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
    except OSError as exc:
        raise InputError(f"{path.uri}: cannot read it ({exc.strerror or exc})") from None
    return digest.hexdigest()[:32]
