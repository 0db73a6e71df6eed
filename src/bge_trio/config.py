"""Settings: one frozen value built from ``BGE_TRIO_*`` environment variables.

Every setting is validated here, at the edge, so the rest of the server can trust
its inputs. A bad value raises :class:`ConfigError` with a one-line message that
names the variable and the accepted range; the CLI and the ASGI entry point print
that line and exit instead of showing a stack trace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

PREFIX = "BGE_TRIO_"
ProbeMode = Literal["auto", "off", "force"]
Allocator = Literal["predictable", "fast"]
DType = Literal["auto", "fp32", "bf16", "int8"]
Backend = Literal["torch", "openvino", "auto"]
LongInput = Literal["truncate", "error", "chunk"]
LONG_INPUTS: tuple[LongInput, ...] = ("truncate", "error", "chunk")
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


@attrs.frozen
class ModelEntry:
    """One model of ``BGE_TRIO_MODEL``: its path or id, and the name it is served by
    (None: its own)."""

    name: str | None
    spec: str


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the server is configured with; see docs/operations.md for each variable."""

    model: str = "BAAI/bge-m3"  # one model, or several: "a,b" or "name=path,name=path"
    model_name: str | None = None
    max_seq_length: int | None = None
    rerank_max_length: int | None = None  # None: 512 tokens per pair (FlagReranker's)
    workers: int | None = None  # None: auto (see scheduler/lanes.py)
    express_tokens: int = 256
    processes: int = 1
    max_batch: int = 256
    long_input: LongInput = "truncate"
    chunk_window: int | None = None  # None: the longest text that fits
    chunk_overlap: int = 64
    dtype: DType = "auto"
    backend: Backend = "torch"
    allocator: Allocator = "predictable"
    startup_wait_s: float = 30.0
    memory_limit_bytes: int | None = None
    memory_safety: float = 0.7
    memory_headroom_bytes: int = 256 * 1024 * 1024
    probe: ProbeMode = "auto"
    cost_a: float | None = None
    cost_b: float | None = None
    cost_c: float = 0.0
    cache_dir: Path = attrs.field(factory=lambda: _default_cache_dir(os.environ))
    batch_wait_ms: float = 2.0
    max_batch_tokens: int | None = 1024
    max_score_pairs: int = 10_000
    score_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # dense, sparse, colbert
    max_queue_items: int = 4096
    max_queue_tokens: int = 1 << 20
    request_timeout_s: float = 60.0
    failure_threshold: int = 3
    max_input_chars: int = 200_000
    max_body_bytes: int = 64 * 1024 * 1024
    api_key: str | None = attrs.field(default=None, repr=False)
    log_level: str = "INFO"

    def __attrs_post_init__(self) -> None:
        entries = self.models()  # checks the list
        if self.model_name is not None and len(entries) > 1:
            raise ConfigError(
                f"{PREFIX}MODEL_NAME names one model; with several, name each in "
                f"{PREFIX}MODEL as name=path"
            )
        if self.backend == "openvino" and (self.workers or 1) > 1:
            raise ConfigError(
                f"{PREFIX}BACKEND=openvino runs one regular pass at a time with every core "
                f"(OpenVINO fixes a pass's threads when it compiles); leave {PREFIX}WORKERS "
                "unset or 1"
            )
        if self.chunk_window is not None and self.chunk_overlap * 2 > self.chunk_window - 2:
            raise ConfigError(
                f"{PREFIX}CHUNK_OVERLAP={self.chunk_overlap} must be under half of "
                f"{PREFIX}CHUNK_WINDOW={self.chunk_window} (less its two special tokens)"
            )

    def models(self) -> tuple[ModelEntry, ...]:
        """The served models, in order (the first of each kind is its default)."""
        entries = []
        for part in self.model.split(","):
            name, sep, spec = part.strip().partition("=")
            if not sep:
                name, spec = "", name
            if not spec.strip() or (sep and not name.strip()):
                raise ConfigError(
                    f"{PREFIX}MODEL={self.model!r}: expected a model, or a comma-separated "
                    "list of models, each a path or id, optionally as name=path"
                )
            entries.append(ModelEntry(name.strip() or None, spec.strip()))
        names = [entry.name for entry in entries if entry.name is not None]
        if len(set(names)) < len(names):
            raise ConfigError(f"{PREFIX}MODEL={self.model!r}: two models have the same name")
        return tuple(entries)

    def for_model(self, entry: ModelEntry, *, reranker: bool) -> Settings:
        """One model's own settings: its path and name, and its longest input."""
        return attrs.evolve(
            self,
            model=entry.spec,
            model_name=entry.name or self.model_name,
            max_seq_length=self.rerank_max_length if reranker else self.max_seq_length,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``BGE_TRIO_*`` variable; unknown ones are ignored."""
        env = os.environ if environ is None else environ
        r = _Reader(env)
        cost_a = r.get("COST_A", _float(1e-9, 1e12), None)
        cost_b = r.get("COST_B", _float(0.0, 1e12), None)
        if (cost_a is None) != (cost_b is None):
            raise ConfigError(
                f"{PREFIX}COST_A and {PREFIX}COST_B must be set together (bytes per token "
                "and bytes per token squared)"
            )
        return cls(
            model=r.get("MODEL", _nonempty, "BAAI/bge-m3"),
            model_name=r.get("MODEL_NAME", _nonempty, None),
            max_seq_length=r.get("MAX_SEQ_LENGTH", _int(8, 1_000_000), None),
            rerank_max_length=r.get("RERANK_MAX_LENGTH", _int(16, 1_000_000), None),
            workers=r.get("WORKERS", _auto(_int(1, 64)), None),
            express_tokens=r.get("EXPRESS_TOKENS", _int(0, 1_000_000), 256),
            processes=r.get("PROCESSES", _int(1, 256), 1),
            max_batch=r.get("MAX_BATCH", _int(1, 100_000), 256),
            long_input=r.get(
                "LONG_INPUT",
                _choice(*LONG_INPUTS),
                "truncate" if r.get("TRUNCATE", _bool, True) else "error",
            ),
            chunk_window=r.get("CHUNK_WINDOW", _int(16, 1_000_000), None),
            chunk_overlap=r.get("CHUNK_OVERLAP", _int(0, 1_000_000), 64),
            dtype=r.get("DTYPE", _choice("auto", "fp32", "bf16", "int8"), "auto"),
            backend=r.get("BACKEND", _choice("torch", "openvino", "auto"), "torch"),
            allocator=r.get("ALLOCATOR", _choice("predictable", "fast"), "predictable"),
            startup_wait_s=r.get("STARTUP_WAIT_S", _float(0.0, 3600.0), 30.0),
            memory_limit_bytes=r.get("MEMORY_LIMIT_BYTES", _int(1 << 20, 1 << 50), None),
            memory_safety=r.get("MEMORY_SAFETY", _float(0.05, 1.0), 0.7),
            memory_headroom_bytes=r.get("MEMORY_HEADROOM_BYTES", _int(0, 1 << 50), 256 << 20),
            probe=r.get("PROBE", _choice("auto", "off", "force"), "auto"),
            cost_a=cost_a,
            cost_b=cost_b,
            cost_c=r.get("COST_C", _float(0.0, 1e13), 0.0),
            cache_dir=r.get("CACHE_DIR", _path, _default_cache_dir(env)),
            batch_wait_ms=r.get("BATCH_WAIT_MS", _float(0.0, 1000.0), 2.0),
            max_batch_tokens=r.get("MAX_BATCH_TOKENS", _int(8, 1 << 31), 1024),
            max_score_pairs=r.get("MAX_SCORE_PAIRS", _int(1, 10_000_000), 10_000),
            score_weights=r.get("SCORE_WEIGHTS", _weights, (1.0, 1.0, 1.0)),
            max_queue_items=r.get("MAX_QUEUE_ITEMS", _int(1, 10_000_000), 4096),
            max_queue_tokens=r.get("MAX_QUEUE_TOKENS", _int(1, 1 << 40), 1 << 20),
            request_timeout_s=r.get("REQUEST_TIMEOUT_S", _float(0.001, 86400.0), 60.0),
            failure_threshold=r.get("FAILURE_THRESHOLD", _int(1, 1_000_000), 3),
            max_input_chars=r.get("MAX_INPUT_CHARS", _int(1, 1 << 31), 200_000),
            max_body_bytes=r.get("MAX_BODY_BYTES", _int(1024, 1 << 34), 64 * 1024 * 1024),
            api_key=r.get("API_KEY", _nonempty, None),
            log_level=r.get(
                "LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True), "INFO"
            ),
        )


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bge-trio"


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(PREFIX + name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{PREFIX}{name}={raw!r}: {exc}") from None


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"expected an integer in [{lo}, {hi}]") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer in [{lo}, {hi}]")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number in [{lo:g}, {hi:g}]") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"expected a number in [{lo:g}, {hi:g}]")
        return value

    return parse


def _auto(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    """``auto`` (None: the server decides) or a value ``parse`` accepts."""

    def parse_or_auto(raw: str) -> T | None:
        if raw.lower() == "auto":
            return None
        try:
            return parse(raw)
        except ValueError as exc:
            raise ValueError(f"{exc}, or auto") from None

    return parse_or_auto


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str, upper: bool = False) -> Callable[[str], Any]:
    # Any: the caller's field is a Literal of exactly these choices.
    def parse(raw: str) -> Any:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _weights(raw: str) -> tuple[float, float, float]:
    """``dense,sparse,colbert``: three non-negative numbers, not all zero."""
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v < float("inf") for v in values) or sum(values) <= 0:
        raise ValueError("expected three non-negative numbers dense,sparse,colbert, not all zero")
    return values


def _nonempty(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw).expanduser()
