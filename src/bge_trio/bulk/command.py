"""``bge-trio embed INPUT OUTPUT``: arguments to a job, errors to one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys

from bge_trio import logs
from bge_trio.config import Settings
from bge_trio.model.encoder import Output
from bge_trio.model.source import ModelSource

MODES: tuple[Output, ...] = ("dense", "sparse", "colbert")
EXIT_INPUT = 2


def run_embed_command(args: argparse.Namespace, settings: Settings, source: ModelSource) -> int:
    logs.configure(settings.log_level)
    try:
        from bge_trio.bulk.records import available_outputs
        from bge_trio.bulk.rows import Columns, InputError
    except ImportError as exc:
        return _fail(f"{exc.name} is missing: pip install 'bge-trio[bulk]'")
    columns = Columns(id=args.id_column, text=args.text_column)
    offered = available_outputs(source.path)
    try:
        outputs = _outputs(args.outputs, offered)
    except ValueError as exc:
        return _fail(str(exc))
    if args.shard_rows < 1:
        return _fail("--shard-rows must be at least 1")
    try:
        from bge_trio.bulk.job import Job, run_local
        from bge_trio.bulk.store import Location

        try:
            where = Location.parse(args.input), Location.parse(args.output)
        except OSError as exc:
            return _fail(str(exc))
        job = Job(*where, columns, outputs, args.shard_rows)
        if args.ray:
            from bge_trio.bulk.on_ray import RayOptions, run_on_ray

            options = RayOptions(args.ray, args.actors, args.threads_per_actor)
            summary = run_on_ray(job, settings, source, options)
        else:
            summary = run_local(job, settings, source)
    except InputError as exc:
        return _fail(str(exc))
    logging.getLogger("bge_trio.bulk").info(
        "done: %d rows (%d embedded, %d with an error) in %d parts, %d tokens, %.1f s",
        summary.rows,
        summary.embedded,
        summary.failed,
        summary.parts,
        summary.tokens,
        summary.seconds,
    )
    return 0


def _outputs(value: str, offered: frozenset[Output]) -> frozenset[Output]:
    if value == "auto":
        return frozenset(m for m in MODES[:2] if m in offered)
    asked = {part.strip() for part in value.split(",") if part.strip()}
    unknown = asked - set(MODES)
    if unknown or not asked:
        raise ValueError(f"--outputs takes {', '.join(MODES)} (comma-separated), not {value!r}")
    missing = asked - offered
    if missing:
        raise ValueError(
            f"the model has no {' or '.join(sorted(missing))} head; it offers: "
            f"{', '.join(sorted(offered))}"
        )
    return frozenset(asked)  # type: ignore[arg-type]


def _fail(message: str) -> int:
    print(f"bge-trio embed: {message}", file=sys.stderr)
    return EXIT_INPUT
