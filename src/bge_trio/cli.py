"""The ``bge-trio`` command: ``serve``, ``probe`` and ``embed``.

``serve`` is hypercorn with the trio worker and ``bge_trio.asgi:app``; its flags
are another way to set the ``BGE_TRIO_*`` variables, which it exports so every
worker process reads the same settings. ``probe`` runs the memory probe in the
foreground, prints what it measured, and writes the probe cache that a server
with the same configuration will then start from. ``embed`` embeds a corpus file
into Parquet (see :mod:`bge_trio.bulk`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from bge_trio import __version__
from bge_trio.config import PREFIX, ConfigError, Settings
from bge_trio.model.source import ModelNotFoundError, resolve_model

# flag -> environment variable suffix
_SETTING_FLAGS = {
    "model": "MODEL",
    "model_name": "MODEL_NAME",
    "max_seq_length": "MAX_SEQ_LENGTH",
    "workers": "WORKERS",
    "processes": "PROCESSES",
    "max_batch": "MAX_BATCH",
    "dtype": "DTYPE",
    "allocator": "ALLOCATOR",
    "memory_limit_bytes": "MEMORY_LIMIT_BYTES",
    "probe": "PROBE",
    "cache_dir": "CACHE_DIR",
    "log_level": "LOG_LEVEL",
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="local directory, 'bundled', or a cached Hugging Face id; several: "
        "comma-separated, each optionally name=path (an embedder and a cross-encoder)",
    )
    parser.add_argument("--model-name", help="model id reported to clients")
    parser.add_argument("--max-seq-length", help="longest input in tokens")
    parser.add_argument("--workers", help="concurrent forward passes per process")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--allocator", choices=["predictable", "fast"])
    parser.add_argument("--memory-limit-bytes", help="override the detected memory limit")
    parser.add_argument("--cache-dir", help="where the probe cache is kept")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bge-trio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bge-trio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API with hypercorn's trio worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--processes", help="hypercorn worker processes sharing the memory limit (default 1)"
    )
    serve.add_argument("--max-batch", help="inputs allowed in one request")
    serve.add_argument("--probe", choices=["auto", "off", "force"])
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to finish in-flight requests on shutdown",
    )
    _add_setting_flags(serve)

    probe = sub.add_parser("probe", help="measure the model's memory and write the probe cache")
    _add_setting_flags(probe)

    embed = sub.add_parser(
        "embed", help="embed a JSONL or Parquet corpus into Parquet (resumable; or on Ray)"
    )
    embed.add_argument(
        "input",
        help="a .jsonl or .parquet file of rows with an id and a text: a path, or a URI "
        "(s3://bucket/key, gs://...)",
    )
    embed.add_argument(
        "output", help="a directory (a path or s3://bucket/prefix): Parquet parts and a manifest"
    )
    embed.add_argument("--id-column", default="id")
    embed.add_argument("--text-column", default="text")
    embed.add_argument(
        "--outputs",
        default="auto",
        help="comma-separated dense,sparse,colbert (auto: dense, and sparse if the model has it)",
    )
    embed.add_argument(
        "--shard-rows", type=int, default=1000, help="rows per part file (the unit of resuming)"
    )
    embed.add_argument(
        "--ray", metavar="ADDRESS", help="run on Ray actors: 'auto', 'local', or host:port"
    )
    embed.add_argument("--actors", type=int, help="Ray actors (default: cluster CPUs / threads)")
    embed.add_argument("--threads-per-actor", type=int, default=1)
    _add_setting_flags(embed)
    return parser


def _export_settings(args: argparse.Namespace) -> Settings:
    """Flags override the environment; the result is validated and exported."""
    for flag, suffix in _SETTING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[PREFIX + suffix] = str(value)
    return Settings.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _export_settings(args)
    except ConfigError as exc:
        print(f"bge-trio: {exc}", file=sys.stderr)
        return 2
    if argv is None:  # the program itself, not a call from Python
        _start_again_with_huge_pages(settings)  # before torch is imported (most of a second)
    from bge_trio.model.encoder import ModelConfigError
    from bge_trio.model.loading import model_kind

    try:
        # every model, with its own settings (a reranker's longest input is its own)
        models = []
        for entry in settings.models():
            source = resolve_model(entry.spec)
            reranker = model_kind(source.path) == "reranker"
            models.append((settings.for_model(entry, reranker=reranker), source, reranker))
    except (ConfigError, ModelNotFoundError, ModelConfigError) as exc:
        print(f"bge-trio: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args, settings)
    if args.command == "embed":
        from bge_trio.bulk.command import run_embed_command

        embedders = [(own, source) for own, source, reranker in models if not reranker]
        if not embedders:
            print("bge-trio: embed needs an embedding model; none is configured", file=sys.stderr)
            return 2
        return run_embed_command(args, *embedders[0])
    from bge_trio.probe_cli import run_probe_command

    return max(run_probe_command(own, source) for own, source, _ in models)


def _start_again_with_huge_pages(settings: Settings) -> None:
    """Start this command again (same process id, same arguments) with glibc's huge-page
    tunable where the predictable allocator can use it (see
    :mod:`bge_trio.memory.allocator`): glibc reads it only when a process starts. Hypercorn's
    worker processes inherit it. Does nothing where the tunable is set already."""
    from bge_trio.memory.allocator import TUNABLES, tunables_to_start_with

    tunables = tunables_to_start_with(settings.allocator, os.environ)
    if tunables is not None:
        os.environ[TUNABLES] = tunables
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from hypercorn.config import Config

    config = Config()
    config.application_path = "bge_trio.asgi:app"
    config.worker_class = "trio"
    config.workers = settings.processes
    config.bind = [f"{args.host}:{args.port}"]
    config.graceful_timeout = args.graceful_timeout
    # Longer than the 60 s idle timeout of common load balancers, so the server never
    # closes a kept-alive connection the balancer is about to reuse.
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024  # request line + headers
    config.accesslog = None
    config.errorlog = "-"
    if settings.processes > 1:
        import tempfile

        from hypercorn.run import run

        # Every worker process writes its metrics here; a scrape of any one adds them up.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bge-trio-"))

        return run(config) or 0
    # One process: serve in this process, so signals and exit codes are ours.
    trio.run(_serve_here, config, settings)
    return 0


async def _serve_here(config: Any, settings: Settings) -> None:
    from hypercorn.trio import serve

    from bge_trio.app import create_app
    from bge_trio.hosting import Host

    app = create_app(settings)
    engines = app.extensions["bge_trio"]
    host = Host(config.graceful_timeout)

    async def until_signalled() -> None:
        """On the signal, drain (see Engine.begin_shutdown), and let hypercorn stop
        accepting and wait for the answers."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                engines.begin_shutdown(host.drain_window_s())
                return

    await serve(app, config, shutdown_trigger=until_signalled)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
