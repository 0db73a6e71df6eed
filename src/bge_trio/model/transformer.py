"""The transformer of BERT and (XLM-)RoBERTa checkpoints, written out; transformers for the rest.

Why our own: the encoders served most (BGE-M3 and bge-reranker are XLM-RoBERTa, MiniLM
and most sentence-transformers models are BERT) are the same few operations: embeddings,
then post-LayerNorm layers of attention and a feed-forward. transformers' model classes
run them too, but importing its modelling code costs a process about a second (it
imports ``torch._dynamo``, ``torch.distributed.tensor`` and sympy) before it reads a weight,
at every server start, ``bge-trio embed`` and Ray actor, and what a pass does is then
spread over a general machinery (mask builders, output classes, hooks for features an
encoder never uses). Here a pass is :meth:`Transformer.forward`: the key-padding mask
goes to torch's scaled-dot-product attention as (B, 1, 1, S), so a padded batch never
builds an S x S mask (``benchmarks.form``), and the OpenVINO conversion traces exactly
this.

The weights keep transformers' names (``encoder.layer.0.attention.self.query.weight``),
so a checkpoint saved by transformers loads as it is, with or without its ``bert.`` /
``roberta.`` prefix; :func:`load` reports what is missing, of the wrong shape or unused in
the form :func:`bge_trio.model.loading.check_weights` reads. An architecture this module
does not write out (:func:`written_out` says which) is loaded by transformers' ``AutoModel``
behind the same forward (:class:`Wrapped`). Both give transformers' vectors
(``tests/test_transformer.py`` compares them directly; ``tests/test_reference.py``,
``tests/test_semantic.py`` and ``tests/test_reranker.py`` compare the served outputs with
FlagEmbedding's formulas, sentence-transformers and FlagReranker's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import nn
from torch.nn import functional

# An embedding model turns one text into vectors; a reranker (a cross-encoder) reads a
# (query, document) pair as one sequence and gives its relevance logit.
Kind = Literal["embedding", "reranker"]
# Changes whenever a pass of :class:`Transformer` computes or allocates differently: the
# probe cache keys on :func:`implementation`.
VERSION = "1"

# model_type -> the prefix transformers' task models give the base model's weights
_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta."}
# RoBERTa-style position tables start after the padding id (see _Embeddings), so they
# hold pad_token_id + 1 fewer positions than max_position_embeddings says
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"})
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": functional.gelu,
    "gelu_new": lambda x: functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: functional.gelu(x, approximate="tanh"),
    "relu": functional.relu,
    "silu": functional.silu,
}


@attrs.frozen
class ModelConfig:
    """What the server reads from a checkpoint's ``config.json``."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: int
    type_vocab_size: int = 1
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        raw = json.loads((path / "config.json").read_text())
        return cls(
            model_type=str(raw.get("model_type", "")),
            hidden_size=int(raw.get("hidden_size") or raw.get("dim") or raw.get("d_model") or 0),
            num_hidden_layers=int(raw.get("num_hidden_layers") or raw.get("n_layers") or 0),
            vocab_size=int(raw.get("vocab_size", 0)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
            pad_token_id=int(raw.get("pad_token_id") or 0),
            # no field, no token types (transformers writes it for every model that has them)
            type_vocab_size=int(raw.get("type_vocab_size", 1)),
            num_attention_heads=int(raw.get("num_attention_heads", 12)),
            intermediate_size=int(raw.get("intermediate_size", 3072)),
            hidden_act=str(raw.get("hidden_act", "gelu")),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            position_embedding_type=str(raw.get("position_embedding_type", "absolute")),
            raw=raw,
        )


def written_out(config: ModelConfig) -> bool:
    """Whether :class:`Transformer` runs this architecture (else transformers does)."""
    return (
        config.model_type in _PREFIXES
        and config.position_embedding_type == "absolute"
        and config.hidden_act in _ACTIVATIONS
        and config.hidden_size % max(config.num_attention_heads, 1) == 0
        and not config.raw.get("is_decoder", False)
    )


def key_padding(mask: torch.Tensor) -> torch.Tensor:
    """The (B, S) padding mask as attention takes it: (B, 1, 1, S), broadcast over the
    heads and the queries (True: attend). An S x S mask would cost up to 5 bytes per
    B·S² during attention (``benchmarks.form``) and give the same vectors."""
    return mask[:, None, None, :].bool()


def _empty(*shape: int) -> nn.Parameter:
    """A weight with no values yet: the checkpoint's tensor replaces it (:func:`load`).

    torch's own layers fill their weights at random when built, and on the meta device
    (where nothing is allocated) that runs through torch's compiler, whose import alone
    costs most of a second; these layers are built without it.
    """
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """``x @ weight.T + bias``, as ``torch.nn.Linear`` (the same parameter names)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.in_features, self.out_features = inputs, outputs
        self.weight = _empty(outputs, inputs)
        self.bias = _empty(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)


class _Embedding(nn.Module):
    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.weight = _empty(rows, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(ids, self.weight)


class _LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty(width)
        self.bias = _empty(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = _Embedding(config.vocab_size, hidden)
        self.position_embeddings = _Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = _Embedding(max(config.type_vocab_size, 1), hidden)
        self.LayerNorm = _LayerNorm(hidden, config.layer_norm_eps)
        self.offset = config.model_type in OFFSET_POSITIONS
        self.pad_id = config.pad_token_id

    def forward(self, ids: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        if self.offset:  # RoBERTa: positions count the non-padding tokens, after pad_id
            real = ids.ne(self.pad_id).long()
            positions = torch.cumsum(real, dim=1) * real + self.pad_id
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        types = torch.zeros_like(ids) if segments is None else segments
        out = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(types)
        )
        return self.LayerNorm(out)  # type: ignore[no-any-return]


class _SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = Linear(hidden, hidden)
        self.key = Linear(hidden, hidden)
        self.value = Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, width = hidden.shape

        def split(projection: Linear) -> torch.Tensor:
            projected: torch.Tensor = projection(hidden)
            return projected.view(batch, seq, self.heads, -1).transpose(1, 2)

        context = functional.scaled_dot_product_attention(
            split(self.query), split(self.key), split(self.value), attn_mask=mask
        )
        return context.transpose(1, 2).reshape(batch, seq, width)


class _Residual(nn.Module):
    """``LayerNorm(dense(x) + residual)``: the output of attention and of the feed-forward."""

    def __init__(self, inner: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(inner, hidden)
        self.LayerNorm = _LayerNorm(hidden, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # type: ignore[no-any-return]


class _Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _Residual(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)  # type: ignore[no-any-return]


class _Intermediate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class Layer(nn.Module):
    """One encoder layer; the pass's between-layers hook runs before each (see :mod:`.encoder`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Residual(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)  # type: ignore[no-any-return]


class _Layers(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class _Dense(nn.Module):
    """``tanh(dense(x))``: BERT's pooler."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class _RobertaClassifier(nn.Module):
    """RoBERTa's classification head: ``out_proj(tanh(dense(h[:, 0])))``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = Linear(hidden, hidden)
        self.out_proj = Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))  # type: ignore[no-any-return]


class Transformer(nn.Module):
    """A BERT or (XLM-)RoBERTa encoder: token ids, the (B, S) padding mask (None: no
    padding) and token types in; the last hidden state out, or for a cross-encoder
    (``kind="reranker"``, one label) its (B, 1) logits."""

    def __init__(self, config: ModelConfig, kind: Kind = "embedding") -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.embeddings = _Embeddings(config)
        self.encoder = _Layers(config)
        if kind == "reranker" and config.model_type in OFFSET_POSITIONS:
            self.classifier: nn.Module = _RobertaClassifier(config.hidden_size)
        elif kind == "reranker":  # BERT: the pooler, then a linear classifier
            self.pooler = _Dense(config.hidden_size)
            self.classifier = Linear(config.hidden_size, 1)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embeddings(ids, segments)
        attend = None if mask is None else key_padding(mask)
        for layer in self.encoder.layer:
            hidden = layer(hidden, attend)
        if self.kind == "embedding":
            return hidden  # type: ignore[no-any-return]
        first = hidden[:, 0]
        if hasattr(self, "pooler"):
            first = self.pooler(first)
        return self.classifier(first)  # type: ignore[no-any-return]


class Wrapped(nn.Module):
    """A transformers model behind :class:`Transformer`'s forward (the architectures not
    written out here). Its attention gets the (B, 1, 1, S) mask where it runs SDPA."""

    def __init__(self, model: nn.Module, kind: Kind) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        named: dict[str, torch.Tensor] = {"input_ids": ids}
        if mask is not None:
            sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
            named["attention_mask"] = key_padding(mask) if sdpa else mask
        if segments is not None:
            named["token_type_ids"] = segments
        out = self.model(**named)
        if self.kind == "reranker":
            return out.logits  # type: ignore[no-any-return]
        return out.last_hidden_state  # type: ignore[no-any-return]


def with_torch_linears(model: nn.Module) -> nn.Module:
    """``model`` with each :class:`Linear` replaced by a ``torch.nn.Linear`` holding the same
    tensors: ``torch.ao.quantization.quantize_dynamic`` quantizes that class only."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                replacement = nn.Linear(child.in_features, child.out_features, device="meta")
                replacement.load_state_dict(child.state_dict(), assign=True)
                setattr(parent, name, replacement)
    return model


def implementation(model: nn.Module) -> str:
    """What runs the transformer's passes, for cache keys: ours (and its version), or
    transformers' (and the installed version)."""
    if isinstance(model, Wrapped):
        import transformers

        return f"transformers {transformers.__version__}"
    return f"bge-trio {VERSION}"


@attrs.frozen
class Loading:
    """What a checkpoint held against what the model needs (names as the model names them)."""

    missing: list[str]
    mismatched: list[str]
    unexpected: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "missing_keys": self.missing,
            "mismatched_keys": self.mismatched,
            "unexpected_keys": self.unexpected,
        }


WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def has_weights(path: Path) -> bool:
    """Whether the directory holds one checkpoint file this module reads (not sharded)."""
    return any((path / name).is_file() for name in WEIGHTS_FILES)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name (safetensors preferred; ``.bin`` as weights only)."""
    if (path / WEIGHTS_FILES[0]).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS_FILES[0]))
    state = torch.load(path / WEIGHTS_FILES[1], map_location="cpu", weights_only=True, mmap=True)
    return dict(state)


def _own_names(name: str, prefix: str) -> str:
    if name.startswith(prefix):
        name = name[len(prefix) :]
    # checkpoints from TensorFlow-era BERT name LayerNorm's parameters gamma and beta
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )


# Checkpoint entries no model reads: buffers transformers once saved, and the pooler
# of an embedding model (served from the hidden states).
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.")


def load(path: Path, config: ModelConfig, kind: Kind) -> tuple[Transformer, Loading]:
    """The transformer with the checkpoint's weights in fp32, in eval mode, and what the
    checkpoint lacked, held in the wrong shape or held beyond the model."""
    model = Transformer(config, kind)
    expected = model.state_dict()
    prefix = _PREFIXES[config.model_type]
    found: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for name, tensor in read_weights(path).items():
        own = _own_names(name, prefix)
        if own not in expected:
            if not own.startswith(_IGNORED):
                unexpected.append(name)
        elif expected[own].shape != tensor.shape:
            mismatched.append(own)
        else:
            found[own] = tensor.float()
    missing = [name for name in expected if name not in found and name not in mismatched]
    loading = Loading(missing, mismatched, unexpected)
    if missing or mismatched:
        return model, loading
    model.load_state_dict(found, assign=True)
    return model.eval(), loading
