"""The encoder: tokenizer + transformer + heads, and one forward pass for a batch.

Everything here is synchronous and CPU-bound; callers run it in a worker thread
(``trio.to_thread.run_sync``) so the event loop never blocks. One forward pass
returns any mix of the three outputs from the same hidden states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
import torch

from bge_trio.model import heads
from bge_trio.model.pooling import Pooling, pool, read_pooling
from bge_trio.model.source import ModelSource

log = logging.getLogger(__name__)

Output = Literal["dense", "sparse", "colbert"]
DENSE: frozenset[Output] = frozenset({"dense"})
FloatArray = npt.NDArray[np.float32]
# Position-embedding tables of RoBERTa-style models reserve pad_token_id + 1 slots.
_OFFSET_POSITIONS = {"xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"}


@attrs.frozen
class ModelInfo:
    """What a client may rely on about the served model."""

    name: str
    source: ModelSource
    dimension: int
    max_seq_length: int
    position_limit: int
    vocab_size: int
    pooling: Pooling
    outputs: frozenset[Output]
    dtype: str
    colbert_dimension: int | None
    dtype_reason: str = ""


@attrs.frozen(eq=False)
class Embedding:
    """One text's outputs; an output that was not asked for is None."""

    dense: FloatArray | None = None
    sparse: tuple[npt.NDArray[np.int64], FloatArray] | None = None
    colbert: FloatArray | None = None


class ModelConfigError(ValueError):
    """The model directory loads, but the settings cannot be honoured with it."""


class PassAbandoned(Exception):
    """Raised between encoder layers to stop a pass nobody waits for any more."""


# Called on the pass's own thread before every encoder layer; may raise PassAbandoned
# or change the thread's torch threads. Set per call by ``Encoder.forward``.
BetweenLayers = Callable[[], None]
_pass_context = threading.local()


def set_threads(threads: int) -> None:
    """The intra-op threads of torch work started from the calling thread.

    Once a thread has run torch work its count is its own: changing it on one
    forward thread leaves the others as they are (checked on torch 2.13 with OpenMP).
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _before_layer(_module: torch.nn.Module, _args: Any) -> None:
    hook: BetweenLayers | None = getattr(_pass_context, "between_layers", None)
    if hook is not None:
        hook()


class Encoder:
    """A loaded model. Thread-safe for concurrent forward passes (inference only)."""

    def __init__(
        self,
        tokenizer: Any,
        model: torch.nn.Module,
        info: ModelInfo,
        sparse_linear: torch.nn.Linear | None,
        colbert_linear: torch.nn.Linear | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.info = info
        self._sparse = sparse_linear
        self._colbert = colbert_linear
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # FlagEmbedding drops these from lexical weights.
        self.unused_ids = frozenset(
            i
            for i in (
                tokenizer.cls_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                tokenizer.unk_token_id,
            )
            if i is not None
        )
        self.closing_ids = frozenset(
            i for i in (tokenizer.eos_token_id, tokenizer.sep_token_id) if i is not None
        )
        found = self._layer_list()
        self.layers = 0 if found is None else len(found[1])
        for layer in () if found is None else found[1]:
            if not getattr(layer, "_bge_trio_hooked", False):  # once, even if wrapped again
                layer.register_forward_pre_hook(_before_layer)
                setattr(layer, "_bge_trio_hooked", True)  # noqa: B010 - not a Module field

    @classmethod
    def load(
        cls,
        source: ModelSource,
        *,
        name: str | None = None,
        max_seq_length: int | None = None,
        dtype: str = "auto",
        threads: int | None = None,
    ) -> Encoder:
        """Load tokenizer, transformer and the optional BGE-M3 heads (always fp32).

        ``bf16`` stores the transformer's weights in bfloat16 and runs it so. CPU
        autocast was tried first: it recasts every fp32 weight on every pass, which
        made it 1.6x fp32 where bf16 weights are 2.2x, with the same dense cosine to
        fp32 (min 0.9998 on the benchmark corpus). Outputs are pooled in fp32.
        """
        from transformers import AutoModel, AutoTokenizer

        if threads:  # this thread's own count (see set_threads)
            torch.set_num_threads(threads)
        path = source.path
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        with warnings.catch_warnings():  # the load report below says what matters
            warnings.simplefilter("ignore")
            # mismatched shapes are reported (and refused) by check_weights, by name
            model, loading = AutoModel.from_pretrained(
                str(path),
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        check_weights(loading, path)
        model.eval()
        config = model.config
        hidden = int(config.hidden_size)
        sparse_linear = heads.load_linear(path / heads.SPARSE_FILE, hidden)
        colbert_linear = heads.load_linear(path / heads.COLBERT_FILE, hidden)

        dtype, reason = choose_dtype(dtype, bf16_supported())
        if reason.startswith("asked"):
            log.warning("%s", reason)
        if dtype == "bf16":
            model.to(torch.bfloat16)
        if dtype == "int8":
            with warnings.catch_warnings():  # the API is deprecated, and still the simplest
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )

        position_limit = int(config.max_position_embeddings)
        if config.model_type in _OFFSET_POSITIONS:
            position_limit -= int(config.pad_token_id) + 1
        default_max = _sentence_transformers_max_seq(path) or position_limit
        max_seq = max_seq_length or min(default_max, position_limit)
        if max_seq > position_limit:
            raise ModelConfigError(
                f"BGE_TRIO_MAX_SEQ_LENGTH={max_seq} is above this model's limit of "
                f"{position_limit} tokens"
            )

        outputs: set[Output] = {"dense"}
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
            vocab_size=int(config.vocab_size),
            pooling=read_pooling(path),
            outputs=frozenset(outputs),
            dtype=dtype,
            colbert_dimension=None if colbert_linear is None else colbert_linear.out_features,
            dtype_reason=reason,
        )
        return cls(tokenizer, model, info, sparse_linear, colbert_linear)

    # -- memory -------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every tensor of weights the model holds: transformer, buffers and heads."""
        heads_ = [h for h in (self._sparse, self._colbert) if h is not None]
        return list(
            chain(
                self.model.parameters(),
                self.model.buffers(),
                *(h.parameters() for h in heads_),
            )
        )

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    def make_weights_resident(self) -> int:
        """Move every weight into the process's own memory; returns their bytes.

        Weights loaded from safetensors are memory-mapped from the file: a page becomes
        resident only when a pass first reads it, and the kernel may drop it again
        whenever it likes (it is a clean file page) and read it back from disk on the
        next pass. With a 250,002-token vocabulary that is the normal case: BGE-M3's fp32
        embedding matrix alone is 1 GB, one 4 KiB row per token id, so the resident size
        after a warm-up pass misses most of it, grows with traffic, and a pass's peak
        includes weight pages faulted back in. Copying each weight into anonymous memory
        (one tensor at a time, so the extra is one tensor) makes the resident size the
        real one, at once, and keeps it there. Weights already converted (bf16, int8)
        live in anonymous memory and are left as they are.
        """
        if self.info.dtype == "fp32":
            with torch.inference_mode():
                self.model._apply(lambda tensor: tensor.clone())  # type: ignore[no-untyped-call]
        return self.weight_bytes()

    @contextlib.contextmanager
    def shallow(self, layers: int = 2) -> Iterator[int]:
        """Run only the first ``layers`` encoder layers while the block runs; yields the depth.

        For the memory probe: an inference pass frees each layer's intermediates before
        the next layer runs, so every layer after the first peaks alike, and a two-layer
        pass peaks where the full-depth one does (measured on the BGE-M3 architecture:
        within 0.3 % at three shapes; one layer is 4.5 % lower, because the embedding
        output it reads stays referenced for the whole pass). Models whose layer list
        cannot be found run at full depth. Not for serving: the gate must be closed.
        """
        found = self._layer_list()
        total = 0 if found is None else len(found[1])
        if found is None or layers >= total:
            yield total
            return
        name, full = found
        parent_name, _, attribute = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attribute, torch.nn.ModuleList(list(full)[:layers]))
        try:
            yield layers
        finally:
            setattr(parent, attribute, full)

    def _layer_list(self) -> tuple[str, torch.nn.ModuleList] | None:
        """The encoder's list of layers (named as the model names it), if it has one."""
        total = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        return next(
            (
                (name, module)
                for name, module in self.model.named_modules()
                if isinstance(module, torch.nn.ModuleList) and len(module) == total and name
            ),
            None,
        )

    # -- tokens -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, untruncated (so over-long inputs can be reported)."""
        if not texts:
            return []
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[Token]]:
        """Each text's tokens with their text pieces and character offsets."""
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=add_special_tokens,
            truncation=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            verbose=False,
        )
        out = []
        for text, ids, offsets, special in zip(
            texts,
            encoded["input_ids"],
            encoded["offset_mapping"],
            encoded["special_tokens_mask"],
            strict=True,
        ):
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            row = []
            for token_id, (start, stop), is_special, piece in zip(
                ids, offsets, special, pieces, strict=True
            ):
                if is_special:
                    row.append(Token(token_id, piece, True, None, None))
                else:
                    row.append(Token(token_id, text[start:stop], False, start, stop))
            out.append(row)
        return out

    def decode(self, token_ids: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]:
        return [
            self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
            for ids in token_ids
        ]

    def truncate(self, ids: Sequence[int], length: int) -> list[int]:
        """Cut to ``length`` tokens, keeping a closing special token as the tokenizer would."""
        if len(ids) <= length:
            return list(ids)
        if length >= 2 and ids[-1] in self.closing_ids:
            return [*ids[: length - 1], ids[-1]]
        return list(ids[:length])

    # -- forward ------------------------------------------------------------------------

    def forward(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output] = DENSE,
        between_layers: BetweenLayers | None = None,
    ) -> list[Embedding]:
        """Run one padded batch and return each text's requested outputs, in order.

        ``between_layers`` runs before each encoder layer on this thread: it may stop
        the pass (raise :class:`PassAbandoned`) or change this thread's torch threads.
        """
        if not batch:
            return []
        if between_layers is None:
            return self._forward(batch, outputs)
        _pass_context.between_layers = between_layers
        try:
            return self._forward(batch, outputs)
        finally:
            _pass_context.between_layers = None

    def _forward(
        self, batch: Sequence[Sequence[int]], outputs: frozenset[Output]
    ) -> list[Embedding]:
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            hidden = self.model(
                input_ids=ids, attention_mask=_key_padding_mask(self.model, mask, lengths)
            ).last_hidden_state.float()
            dense = pool(hidden, mask, self.info.pooling).numpy() if "dense" in outputs else None
            weights = (
                heads.sparse_token_weights(self._sparse, hidden).numpy()
                if "sparse" in outputs and self._sparse is not None
                else None
            )
            colbert = (
                heads.colbert_vectors(self._colbert, hidden, mask).numpy()
                if "colbert" in outputs and self._colbert is not None
                else None
            )
        results = []
        for row, seq in enumerate(batch):
            results.append(
                Embedding(
                    dense=None if dense is None else dense[row].copy(),
                    sparse=None
                    if weights is None
                    else heads.sparse_vector(seq, weights[row], self.unused_ids),
                    colbert=None if colbert is None else colbert[row, : lengths[row] - 1].copy(),
                )
            )
        return results


def _key_padding_mask(
    model: torch.nn.Module, mask: torch.Tensor, lengths: Sequence[int]
) -> torch.Tensor | None:
    """The attention mask to hand the transformer, chosen for memory.

    Given the (B, S) padding mask, transformers expands it to a (B, 1, S, S) boolean
    mask, and torch's CPU attention turns that into a float mask of the same shape:
    5 bytes per B·S², 670 MB for two 8192-token texts, more than the rest of the pass.
    With SDPA attention a (B, 1, 1, S) mask broadcasts over the queries and gives the
    same vectors (tested against transformers' own mask), so the pass costs what its
    tokens cost. A batch without padding needs no mask at all. Other attention kinds
    get the (B, S) mask.
    """
    if min(lengths) == max(lengths):
        return None
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return mask[:, None, None, :].bool()
    return mask


# Weights the server never uses: a checkpoint may leave them out (BGE-M3 and sentence
# embedding models are served from the hidden states; the pooler head is unused).
UNUSED_WEIGHTS = ("pooler.",)


def check_weights(loading: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint that lacks weights the model needs; name what is ignored.

    transformers fills a missing weight with random values and carries on, so a wrong
    or truncated checkpoint would serve meaningless vectors without a word.
    """
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = sorted(
        str(key[0] if isinstance(key, tuple) else key)
        for key in loading.get("mismatched_keys") or []
    )
    unused = [key for key in missing if key.startswith(UNUSED_WEIGHTS)]
    needed = [key for key in missing if not key.startswith(UNUSED_WEIGHTS)] + mismatched
    if needed:
        shown = ", ".join(needed[:5]) + (f" and {len(needed) - 5} more" if len(needed) > 5 else "")
        raise ModelConfigError(
            f"{path}: the checkpoint lacks {len(needed)} weight(s) the model needs or has them "
            f"in the wrong shape ({shown}); it would serve meaningless vectors"
        )
    if unused:
        log.info("not in the checkpoint and not used by this server: %s", ", ".join(unused))
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
    emulated and slower than fp32.
    """
    if asked == "auto":
        if native_bf16:
            return "bf16", "auto: this CPU computes bf16 natively"
        return "fp32", "auto: this CPU has no native bf16, so bf16 would be slower"
    if asked == "bf16" and not native_bf16:
        return "fp32", "asked for bf16, but this CPU has no native bf16; serving fp32"
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


@attrs.frozen
class Token:
    """One token of a text, as /tokenize shows it."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None
