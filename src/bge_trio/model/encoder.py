"""The encoder: tokenizer + transformer + heads, and one forward pass for a batch.

Everything here is synchronous and CPU-bound; callers run it in a worker thread
(``trio.to_thread.run_sync``) so the event loop never blocks. One forward pass
returns any mix of the three outputs from the same hidden states.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any, Literal, Protocol

import attrs
import numpy as np
import numpy.typing as npt
import torch

from bge_trio.model import heads
from bge_trio.model.pooling import Pooling, pool
from bge_trio.model.source import ModelSource
from bge_trio.model.tokens import Tokenizer
from bge_trio.model.transformer import Kind, ModelConfig

log = logging.getLogger(__name__)

Output = Literal["dense", "sparse", "colbert", "score"]
DENSE: frozenset[Output] = frozenset({"dense"})
SCORE: frozenset[Output] = frozenset({"score"})  # a cross-encoder's one output
FloatArray = npt.NDArray[np.float32]


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
    kind: Kind = "embedding"
    backend: str = "torch"  # what runs the transformer: torch or openvino


@attrs.frozen(eq=False)
class Embedding:
    """One text's outputs (or one pair's score); an output that was not asked for is None."""

    dense: FloatArray | None = None
    sparse: tuple[npt.NDArray[np.int64], FloatArray] | None = None
    colbert: FloatArray | None = None
    score: float | None = None  # a cross-encoder's logit for the pair


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


class CompiledTransformer(Protocol):
    """A transformer compiled by another backend (see :mod:`.openvino`): token ids, mask
    (and segments) in, the fp32 last hidden state (a cross-encoder: its logits) out."""

    shallow_layers: int
    version: str  # the backend's own version (the probe cache keys on it)

    def run(
        self, inputs: list[torch.Tensor], between: BetweenLayers | None, express: bool
    ) -> torch.Tensor: ...

    def weight_bytes(self) -> int: ...

    def shallow(self) -> contextlib.AbstractContextManager[int]: ...


def _before_layer(_module: torch.nn.Module, _args: Any) -> None:
    hook: BetweenLayers | None = getattr(_pass_context, "between_layers", None)
    if hook is not None:
        hook()


class Encoder:
    """A loaded model. Thread-safe for concurrent forward passes (inference only)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model: torch.nn.Module | None,
        info: ModelInfo,
        sparse_linear: torch.nn.Linear | None,
        colbert_linear: torch.nn.Linear | None,
        config: ModelConfig,
        *,
        compiled: CompiledTransformer | None = None,
    ) -> None:
        """``model``: the torch transformer (:mod:`.transformer`), or None where
        ``compiled`` runs it."""
        self.tokenizer = tokenizer
        self.model = model
        self.compiled = compiled
        self.config = config
        self.info = info
        self.sparse_linear = self._sparse = sparse_linear
        self.colbert_linear = self._colbert = colbert_linear
        pad = tokenizer.id_of("pad")
        self.pad_id: int = 0 if pad is None else pad
        # FlagEmbedding drops these from lexical weights.
        self.unused_ids = frozenset(
            i for role in ("cls", "eos", "pad", "unk") if (i := tokenizer.id_of(role)) is not None
        )
        self.closing_ids = frozenset(
            i for role in ("eos", "sep") if (i := tokenizer.id_of(role)) is not None
        )
        found = self._layer_list()
        if compiled is not None:
            self.layers = config.num_hidden_layers
        else:
            self.layers = 0 if found is None else len(found[1])
        for layer in () if found is None else found[1]:
            if not getattr(layer, "_bge_trio_hooked", False):  # once, even if wrapped again
                layer.register_forward_pre_hook(_before_layer)
                setattr(layer, "_bge_trio_hooked", True)  # noqa: B010 - not a Module field

    # -- memory -------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every torch tensor of weights the model holds: transformer, buffers and heads."""
        heads_ = [h for h in (self._sparse, self._colbert) if h is not None]
        transformer = [] if self.model is None else [self.model.parameters(), self.model.buffers()]
        return list(chain(*transformer, *(h.parameters() for h in heads_)))

    def weight_bytes(self) -> int:
        compiled = 0 if self.compiled is None else self.compiled.weight_bytes()
        return compiled + sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @property
    def backend(self) -> str:
        return self.info.backend

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
        if self.info.dtype == "fp32" and self.model is not None:
            with torch.inference_mode():
                self.model._apply(lambda tensor: tensor.clone())  # type: ignore[no-untyped-call]
        return self.weight_bytes()

    @contextlib.contextmanager
    def shallow(self, layers: int = 2) -> Iterator[int]:
        """Run only the first ``layers`` encoder layers while the block runs; yields the depth.

        For the memory probe: an inference pass frees each layer's intermediates before
        the next layer runs, so every layer after the first peaks alike, and a two-layer
        pass peaks where the full-depth one does (measured on the BGE-M3 architecture by
        ``benchmarks.m3``). In transformers' models one layer peaks about one hidden state
        lower (``benchmarks.form``): the embedding output stays referenced for the whole pass.
        Our own transformer lets go of it, and one layer peaks as two do; two serve both. Models
        whose layer list cannot be found run at full depth. Not for serving: the gate must be
        closed.
        """
        if self.compiled is not None:
            with self.compiled.shallow() as depth:
                yield depth
            return
        found = self._layer_list()
        total = 0 if found is None else len(found[1])
        if found is None or layers >= total:
            yield total
            return
        name, full = found
        parent_name, _, attribute = name.rpartition(".")
        assert self.model is not None  # found in it
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attribute, torch.nn.ModuleList(list(full)[:layers]))
        try:
            yield layers
        finally:
            setattr(parent, attribute, full)

    def _layer_list(self) -> tuple[str, torch.nn.ModuleList] | None:
        """The encoder's list of layers (named as the model names it), if it has one."""
        if self.model is None:
            return None
        total = self.config.num_hidden_layers
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
        return [list(encoding.ids) for encoding in self.tokenizer.encode(texts)]

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[Token]]:
        """Each text's tokens with their text pieces and character offsets."""
        out = []
        for text, encoding in zip(
            texts, self.tokenizer.encode(texts, add_special_tokens), strict=True
        ):
            ids = encoding.ids
            pieces = self.tokenizer.pieces(ids)
            row = []
            for token_id, (start, stop), is_special, piece in zip(
                ids, encoding.offsets, encoding.special_tokens_mask, pieces, strict=True
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

    def pair_ids(
        self, query: str, documents: Sequence[str], longest: int | None = None
    ) -> list[list[int]]:
        """Each (query, document) pair's token ids, as FlagEmbedding's ``FlagReranker``
        builds them: the query cut to three quarters of the longest input, each document
        to what is left of it, then the model's pair template (XLM-R:
        ``<s> query </s></s> document </s>``). Never longer than ``longest`` (default:
        ``max_seq_length``).
        """
        backend = self.tokenizer.backend
        longest = min(longest or self.info.max_seq_length, self.info.max_seq_length)
        question = backend.encode(query, add_special_tokens=False)
        question.truncate(longest * 3 // 4)
        room = max(0, longest - len(question.ids) - self.pair_special_tokens)
        pairs = []
        for passage in backend.encode_batch(list(documents), add_special_tokens=False):
            passage.truncate(room)
            pairs.append(list(backend.post_process(question, passage, True).ids))
        return pairs

    @property
    def pair_special_tokens(self) -> int:
        return self.tokenizer.special_tokens_to_add(pair=True)

    # -- forward ------------------------------------------------------------------------

    def forward(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output] = DENSE,
        between_layers: BetweenLayers | None = None,
        express: bool = False,
    ) -> list[Embedding]:
        """Run one padded batch and return each text's requested outputs, in order.

        ``between_layers`` runs before each encoder layer on this thread: it may stop
        the pass (raise :class:`PassAbandoned`) or change this thread's torch threads
        (a compiled backend calls it while its pass runs instead; see :mod:`.openvino`).
        ``express``: the pass runs on the express lane (a compiled backend has a model
        of its own for it).
        """
        if not batch:
            return []
        if between_layers is None or self.compiled is not None:
            return self._forward(batch, outputs, between_layers, express)
        _pass_context.between_layers = between_layers
        try:
            return self._forward(batch, outputs, None, express)
        finally:
            _pass_context.between_layers = None

    def _forward(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None,
        express: bool,
    ) -> list[Embedding]:
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        if self.info.kind == "reranker":
            logits = self._transformer(ids, mask, lengths, between_layers, express)
            return [Embedding(score=float(logit)) for logit in logits[:, 0]]
        hidden = self._transformer(ids, mask, lengths, between_layers, express)
        with torch.inference_mode():
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

    def _transformer(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lengths: Sequence[int],
        between_layers: BetweenLayers | None,
        express: bool,
    ) -> torch.Tensor:
        """The fp32 last hidden state (a cross-encoder: its logits) of the padded batch."""
        segments = self._segments(ids)
        if self.compiled is not None:
            inputs = [ids, mask, *segments.values()]
            return self.compiled.run(inputs, between_layers, express)
        assert self.model is not None
        padded = min(lengths) != max(lengths)  # a batch without padding needs no mask
        with torch.inference_mode():
            out = self.model(ids, mask if padded else None, segments.get("token_type_ids"))
            return out.float()  # type: ignore[no-any-return]

    def _segments(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token type ids for models that have them (BERT-style pairs: 0 up to the first
        separator, 1 after it); XLM-RoBERTa has one type and needs none."""
        if not self.has_segments:
            return {}
        closing = torch.zeros_like(ids, dtype=torch.bool)
        for token_id in self.closing_ids:
            closing |= ids == token_id
        # 1 strictly after the first separator of each row
        after = (torch.cumsum(closing.long(), dim=1) - closing.long()) > 0
        return {"token_type_ids": after.long()}

    @property
    def has_segments(self) -> bool:
        """Whether a pair's passes carry token type ids (BERT-style cross-encoders)."""
        return (
            self.info.kind == "reranker"
            and self.config.type_vocab_size >= 2
            and bool(self.closing_ids)
        )


@attrs.frozen
class Token:
    """One token of a text, as /tokenize shows it."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None
