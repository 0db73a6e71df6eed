"""Loading a model directory into an :class:`~bge_trio.model.encoder.Encoder`:
tokenizer, transformer, the optional BGE-M3 heads, the dtype to serve and the
longest input, with every missing weight reported.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from bge_trio.model import heads, transformer
from bge_trio.model import openvino as ov_backend
from bge_trio.model.encoder import Encoder, ModelConfigError, ModelInfo, Output
from bge_trio.model.pooling import read_pooling
from bge_trio.model.source import ModelSource
from bge_trio.model.tokens import Tokenizer, TokenizerMissing
from bge_trio.model.transformer import Kind, ModelConfig

log = logging.getLogger("bge_trio.model.encoder")


@attrs.frozen
class OpenVinoTarget:
    """Serve the transformer with OpenVINO (see :mod:`.openvino`): where its conversion is
    cached, and the express lane's threads (0: no express lane)."""

    directory: Path
    express_threads: int
    on_step: Callable[[str], None] = lambda _step: None  # startup reports what it does


def load_encoder(
    source: ModelSource,
    *,
    name: str | None = None,
    max_seq_length: int | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    openvino: OpenVinoTarget | None = None,
) -> Encoder:
    """Load tokenizer, transformer and the optional BGE-M3 heads (heads always fp32).

    ``bf16`` stores the transformer's weights in bfloat16 and runs it so. CPU
    autocast was tried first: it recasts every fp32 weight on every pass, which
    made it 1.6x fp32 where bf16 weights are 2.2x, with the same dense cosine to
    fp32 (min 0.9998 on the benchmark corpus). Outputs are pooled in fp32.

    With ``openvino`` the transformer is converted once (in a child process, for the
    served dtype) and compiled; this process never loads the torch transformer.
    """
    if threads:  # this thread's own count (see set_threads)
        torch.set_num_threads(threads)
    path = source.path
    kind = model_kind(path)
    tokenizer = load_tokenizer(path)
    dtype, reason = choose_dtype(dtype, bf16_supported())
    if openvino is not None and dtype == "int8":
        raise ModelConfigError(
            "BGE_TRIO_BACKEND=openvino serves fp32 or bf16; BGE_TRIO_DTYPE=int8 is torch's"
        )
    # OpenVINO converts the checkpoint in a process of its own: see compile_openvino
    config = ModelConfig.read(path)
    model = None if openvino is not None else _converted(_transformer(path, config, kind), dtype)
    hidden = config.hidden_size
    reranker = kind == "reranker"
    sparse_linear = None if reranker else heads.load_linear(path / heads.SPARSE_FILE, hidden)
    colbert_linear = None if reranker else heads.load_linear(path / heads.COLBERT_FILE, hidden)
    if "emulated" in reason:
        log.warning("%s", reason)
    position_limit, max_seq = _lengths(config, path, max_seq_length, kind)
    outputs: set[Output] = {"score"} if reranker else {"dense"}
    if sparse_linear is not None:
        outputs.add("sparse")
    if colbert_linear is not None:
        outputs.add("colbert")
    info = ModelInfo(
        name=name or source.default_name,
        source=source,
        dimension=hidden,
        max_seq_length=max_seq,
        position_limit=position_limit,
        vocab_size=config.vocab_size,
        pooling=read_pooling(path),
        outputs=frozenset(outputs),
        dtype=dtype,
        colbert_dimension=None if colbert_linear is None else colbert_linear.out_features,
        dtype_reason=reason,
        kind=kind,
    )
    encoder = Encoder(tokenizer, model, info, sparse_linear, colbert_linear, config)
    if openvino is None:
        return encoder
    return compile_openvino(encoder, openvino, threads or torch.get_num_threads())


def compile_openvino(encoder: Encoder, target: OpenVinoTarget, threads: int) -> Encoder:
    """The same encoder with its transformer compiled by OpenVINO, converted first from
    the checkpoint's fp32 weights unless cached (in a process of its own: see
    :mod:`.conversion`; the torch model ``encoder`` may hold is not what is converted)."""
    info = encoder.info
    if not ov_backend.converted(target.directory):
        target.on_step("converting the transformer to OpenVINO (once; cached for later starts)")
        started = time.perf_counter()
        if ov_backend.convert_once(
            info.source.path,
            target.directory,
            half_weights=info.dtype == "bf16",
            threads=threads,
        ):
            seconds = time.perf_counter() - started
            log.info("converted %s to OpenVINO in %.1fs: %s", info.name, seconds, target.directory)
        else:
            log.info("%s: another process converted it to OpenVINO", info.name)
    target.on_step("compiling the OpenVINO model")
    compiled = ov_backend.OpenVinoTransformer(
        target.directory,
        threads=threads,
        express_threads=target.express_threads,
        dtype=info.dtype,
    )
    return Encoder(
        encoder.tokenizer,
        None,  # the transformer is OpenVINO's
        attrs.evolve(info, backend="openvino"),
        encoder.sparse_linear,
        encoder.colbert_linear,
        encoder.config,
        compiled=compiled,
    )


def load_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's tokenizer (:mod:`.tokens`)."""
    try:
        return Tokenizer.read(path)
    except TokenizerMissing as exc:
        raise ModelConfigError(str(exc)) from None


# FlagEmbedding's FlagReranker reads pairs of at most this many tokens unless told more.
RERANK_MAX_LENGTH = 512


def model_kind(path: Path) -> Kind:
    """``reranker`` for a one-label sequence classifier (a cross-encoder such as
    bge-reranker-v2-m3), else ``embedding``; read from ``config.json`` alone."""
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return "embedding"
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if labels != 1:
        raise ModelConfigError(
            f"{path}: a sequence classifier with {labels} labels; only one-label "
            "cross-encoders (rerankers) are served"
        )
    return "reranker"


def _transformer(path: Path, config: ModelConfig, kind: Kind) -> torch.nn.Module:
    """The transformer in fp32 and eval mode, its checkpoint checked by :func:`check_weights`:
    our own for BERT and (XLM-)RoBERTa (:mod:`.transformer`), transformers' for the rest."""
    if transformer.written_out(config) and transformer.has_weights(path):
        model, loading = transformer.load(path, config, kind)
        check_weights(loading.as_dict(), path, unused=())
        return model
    return transformer.Wrapped(_transformers_model(path, kind), kind)


def _transformers_model(path: Path, kind: Kind) -> Any:
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto: Any = AutoModelForSequenceClassification if kind == "reranker" else AutoModel
    with warnings.catch_warnings():  # the load report below says what matters
        warnings.simplefilter("ignore")
        # mismatched shapes are reported (and refused) by check_weights, by name
        model, loading = auto.from_pretrained(
            str(path),
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    # a classifier reads every weight it has (BERT's pooler included)
    check_weights(loading, path, unused=() if kind == "reranker" else UNUSED_WEIGHTS)
    model.eval()
    return model


def _converted(model: Any, dtype: str) -> Any:
    if dtype == "bf16":
        model.to(torch.bfloat16)
    if dtype == "int8":
        with warnings.catch_warnings():  # the API is deprecated, and still the simplest
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                transformer.with_torch_linears(model), {torch.nn.Linear}, dtype=torch.qint8
            )
    return model


def _lengths(config: ModelConfig, path: Path, asked: int | None, kind: Kind) -> tuple[int, int]:
    """The model's position limit and the longest input to serve (asked, or its default:
    a reranker's pair is at most :data:`RERANK_MAX_LENGTH` tokens, as FlagReranker's)."""
    position_limit = config.max_position_embeddings
    if config.model_type in transformer.OFFSET_POSITIONS:
        position_limit -= config.pad_token_id + 1
    if kind == "reranker":
        default_max = RERANK_MAX_LENGTH
    else:
        default_max = _sentence_transformers_max_seq(path) or position_limit
    max_seq = asked or min(default_max, position_limit)
    if max_seq > position_limit:
        raise ModelConfigError(
            f"BGE_TRIO_MAX_SEQ_LENGTH={max_seq} is above this model's limit of "
            f"{position_limit} tokens"
        )
    return position_limit, max_seq


# Weights the server never uses: a checkpoint may leave them out (BGE-M3 and sentence
# embedding models are served from the hidden states; the pooler head is unused).
UNUSED_WEIGHTS = ("pooler.",)


def check_weights(
    loading: dict[str, Any], path: Path, unused: tuple[str, ...] = UNUSED_WEIGHTS
) -> None:
    """Refuse a checkpoint that lacks weights the model needs; name what is ignored.

    transformers fills a missing weight with random values and carries on, so a wrong
    or truncated checkpoint would serve meaningless vectors without a word.
    """
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = sorted(
        str(key[0] if isinstance(key, tuple) else key)
        for key in loading.get("mismatched_keys") or []
    )
    ignored = [key for key in missing if unused and key.startswith(unused)]
    needed = [key for key in missing if not (unused and key.startswith(unused))] + mismatched
    if needed:
        shown = ", ".join(needed[:5]) + (f" and {len(needed) - 5} more" if len(needed) > 5 else "")
        raise ModelConfigError(
            f"{path}: the checkpoint lacks {len(needed)} weight(s) the model needs or has them "
            f"in the wrong shape ({shown}); it would serve meaningless vectors"
        )
    if ignored:
        log.info("not in the checkpoint and not used by this server: %s", ", ".join(ignored))
    unexpected = sorted(loading.get("unexpected_keys") or [])
    if unexpected:
        log.warning(
            "the checkpoint has %d weight(s) this model does not use, ignored: %s",
            len(unexpected),
            ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""),
        )


def choose_dtype(asked: str, native_bf16: bool) -> tuple[str, str]:
    """The dtype to serve and why.

    bf16 weights pay only where the CPU computes in bf16 natively (AVX512-BF16 or AMX
    on x86, BF16 on ARM, as oneDNN reports it): there BGE-M3 runs 3.8x and MiniLM 2x
    faster than fp32, with dense cosine to fp32 of at least 0.9998. Elsewhere bf16 is
    emulated and slower than fp32, so ``auto`` serves fp32 there. An explicit ``bf16``
    is served as asked on any CPU (with a warning where it is emulated): the same
    vectors from every machine of a mixed fleet, and bf16's code paths on any machine.
    """
    if asked == "auto":
        if native_bf16:
            return "bf16", "auto: this CPU computes bf16 natively"
        return "fp32", "auto: this CPU has no native bf16, so bf16 would be slower"
    if asked == "bf16" and not native_bf16:
        return "bf16", "asked for bf16; this CPU has no native bf16, so it is emulated (slower)"
    return asked, f"BGE_TRIO_DTYPE={asked}"


def bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _sentence_transformers_max_seq(path: Path) -> int | None:
    config = path / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return None
