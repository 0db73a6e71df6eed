"""An independent, straightforward BGE-M3 implementation written from the formulas.

It loads the tiny model with plain transformers and torch and computes dense,
sparse and ColBERT outputs (and their scores) the way FlagEmbedding's
BGEM3FlagModel defines them, with Python loops where that is clearest. Tests
compare the server against it. Texts are tokenised by the checkpoint's own
``tokenizer.json`` through the ``tokenizers`` library (as FlagEmbedding on transformers 4
and TEI do), not by transformers, whose version 5 builds some tokenizers from their class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel


@dataclass
class RefOutput:
    dense: np.ndarray
    sparse: dict[int, float]
    colbert: np.ndarray
    tokens: int


class ReferenceM3:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        hidden = self.model.config.hidden_size
        self.sparse_linear = torch.nn.Linear(hidden, 1)
        self.sparse_linear.load_state_dict(torch.load(model_dir / "sparse_linear.pt"))
        self.colbert_linear = torch.nn.Linear(hidden, hidden)
        self.colbert_linear.load_state_dict(torch.load(model_dir / "colbert_linear.pt"))
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        specials = ("<s>", "</s>", "<pad>", "<unk>")  # XLM-R's CLS, EOS, PAD, UNK
        self.unused = {self.tokenizer.token_to_id(token) for token in specials}

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The checkpoint's token ids for ``text``."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode(self, texts: list[str]) -> list[RefOutput]:
        return self.encode_ids([self.ids(text) for text in texts])

    def encode_ids(self, id_lists: list[list[int]]) -> list[RefOutput]:
        """The same outputs for token id lists (special tokens included), padded here."""
        width = max(len(ids) for ids in id_lists)
        pad = self.pad_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in id_lists])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in id_lists])
        return self._run({"input_ids": input_ids, "attention_mask": mask})

    def _run(self, enc: Any) -> list[RefOutput]:
        with torch.no_grad():
            h = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            h = h.last_hidden_state
            dense = torch.nn.functional.normalize(h[:, 0], dim=-1)
            weights = torch.relu(self.sparse_linear(h)).squeeze(-1)
            mask = enc["attention_mask"]
            colbert = self.colbert_linear(h[:, 1:]) * mask[:, 1:][:, :, None].float()
            colbert = torch.nn.functional.normalize(colbert, dim=-1)
        out = []
        for row in range(len(enc["input_ids"])):
            ids = enc["input_ids"][row].tolist()
            lexical: dict[int, float] = {}
            for token, w in zip(ids, weights[row].tolist(), strict=True):
                if token in self.unused or w <= 0:
                    continue
                lexical[token] = max(lexical.get(token, 0.0), w)
            n = int(mask[row].sum())
            out.append(RefOutput(dense[row].numpy(), lexical, colbert[row, : n - 1].numpy(), n))
        return out


def dense_score(q: np.ndarray, p: np.ndarray) -> float:
    return float(np.dot(q, p))


def sparse_score(q: dict[int, float], p: dict[int, float]) -> float:
    return sum(w * p[t] for t, w in q.items() if t in p)


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    total = 0.0
    for qv in q:
        total += max(float(np.dot(qv, pv)) for pv in p)
    return total / len(q)


def assert_dense_answer(response: httpx.Response, reference: ReferenceM3, texts: list[str]) -> None:
    """The response is a 200 whose body holds each text's dense vector, in order, as the
    reference computes it, and the texts' tokens as its usage."""
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.encode(texts)
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    for item, ref in zip(body["data"], expected, strict=True):
        assert item["object"] == "embedding"
        np.testing.assert_allclose(item["embedding"], ref.dense, atol=1e-5)
    tokens = sum(ref.tokens for ref in expected)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


class ReferenceReranker:
    """FlagEmbedding's ``FlagReranker.compute_score``, written out: the query's tokens cut
    to 3/4 of ``max_length``, the passage's to ``max_length``, the pair built by the
    tokenizer's pair template with the passage cut so the whole fits (``only_second``),
    one pair at a time through plain transformers, the logit as the score."""

    def __init__(self, model_dir: Path, max_length: int = 512) -> None:
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
        self.max_length = max_length

    def pair(self, query: str, passage: str) -> list[int]:
        q = self.tokenizer.encode(query, add_special_tokens=False).ids[: self.max_length * 3 // 4]
        p = self.tokenizer.encode(passage, add_special_tokens=False).ids[: self.max_length]
        specials = self.tokenizer.num_special_tokens_to_add(True)
        overflow = len(q) + len(p) + specials - self.max_length
        if overflow > 0:
            p = p[: len(p) - overflow]
        cls, sep = self.tokenizer.token_to_id("<s>"), self.tokenizer.token_to_id("</s>")
        assert cls is not None
        assert sep is not None
        return [cls, *q, sep, sep, *p, sep]  # XLM-R's pair template

    def logits(self, query: str, passages: list[str]) -> list[float]:
        out = []
        with torch.no_grad():
            for passage in passages:
                ids = torch.tensor([self.pair(query, passage)])
                out.append(float(self.model(input_ids=ids).logits[0, 0]))
        return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + float(np.exp(-x)))
