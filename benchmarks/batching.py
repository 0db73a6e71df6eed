"""Batch cap and allocator: in-process tokens/s on the load benchmark's corpus.

    python -m benchmarks.batching [--model bundled] [--repeats 3]

The corpus (``benchmarks/corpus.jsonl``), length-sorted and cut into batches of at
most ``cap`` padded tokens, through ``Encoder.forward`` on one thread with every
core (no HTTP, no queue), for each cap in ``--caps`` and for both values of
``BGE_TRIO_ALLOCATOR``. glibc's mmap threshold cannot be unset once fixed, so each
allocator runs in a process of its own. Each configuration runs ``--repeats``
times; the table gives the median and the range. Writes ``docs/results/batching.json``
and generates its table into ``docs/performance.md`` between its markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.docs import load_result, save_result
from benchmarks.harness import cpu_name
from benchmarks.reports.batching import table, write_tables

ALLOCATORS = ("predictable", "fast")


def measure(model: str, allocator: str, caps: list[int], repeats: int) -> dict[str, list[float]]:
    """Runs in a process of its own: tokens/s per cap, ``repeats`` runs each."""
    from benchmarks.harness import load_corpus
    from benchmarks.inprocess import ideal
    from bge_trio.cgroups import cpu_count
    from bge_trio.model.loading import load_encoder
    from bge_trio.model.source import resolve_model
    from bge_trio.process import prepare_process

    prepare_process(allocator)  # type: ignore[arg-type]
    encoder = load_encoder(resolve_model(model), dtype="fp32", threads=cpu_count())
    texts = [row["text"] for row in load_corpus()]
    runs: dict[str, list[float]] = {str(cap): [] for cap in caps}
    for _ in range(repeats):  # interleaved, so a drift in the machine's speed hits every cap
        for cap in caps:
            runs[str(cap)].append(ideal(encoder, texts, max_tokens=cap)["tokens_per_s"])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--caps", type=int, nargs="+", default=[512, 1024, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allocator", choices=ALLOCATORS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the tables from batching.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("batching"))
        return
    if args.allocator:  # the child: one allocator
        print(json.dumps(measure(args.model, args.allocator, args.caps, args.repeats)))
        return

    from benchmarks.harness import load_corpus
    from bge_trio.cgroups import cpu_count

    measured = {}
    for allocator in ALLOCATORS:
        command = [sys.executable, "-m", "benchmarks.batching", "--allocator", allocator]
        command += ["--model", args.model, "--repeats", str(args.repeats), "--caps"]
        command += [str(cap) for cap in args.caps]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        measured[allocator] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "setup": {
            "model": "all-MiniLM-L6-v2 (bundled)" if args.model == "bundled" else args.model,
            "texts": len(load_corpus()),
            "repeats": args.repeats,
            "cpus": cpu_count(),
            "machine": cpu_name(),
        },
        "caps": args.caps,
        "tokens_per_s": measured,
    }
    save_result("batching", result)
    write_tables(result)
    print(table(result))


if __name__ == "__main__":
    main()
