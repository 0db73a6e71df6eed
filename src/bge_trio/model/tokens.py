"""The tokenizer: the checkpoint's ``tokenizer.json`` as written, run by the tokenizers library.

Why not transformers' tokenizer classes: transformers 5 builds some tokenizers from their
class instead of the file (``XLMRobertaTokenizer``: WhitespaceSplit + Metaspace and the
class's normaliser), so texts with newlines, tabs, repeated spaces or characters the
file's normaliser rewrites would get other ids than the checkpoint (and transformers 4,
FlagEmbedding, TEI) give them; and importing transformers costs a process most of a
second. The file runs as written, without the truncation or padding it may have been
saved with (inputs are measured untruncated, and batches padded by the server); the
special tokens are named where transformers reads them, ``tokenizer_config.json`` or
``special_tokens_map.json``.

A checkpoint without the file (only a SentencePiece or vocabulary file) gets
transformers' tokenizer for its class, in its fast form (the same library underneath).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from tokenizers import Encoding
from tokenizers import Tokenizer as Backend

TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # the later one wins
_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class TokenizerMissing(ValueError):
    """The checkpoint has no tokenizer this server can run."""


@attrs.frozen(eq=False)
class Tokenizer:
    """Token ids and pieces of texts and pairs; thread-safe (the library's encode is)."""

    backend: Backend
    special: Mapping[str, int]  # role ("cls", "pad", ...) -> token id, for the roles it has
    clean_up_spaces: bool = False  # decoding removes the space before punctuation

    @classmethod
    def read(cls, path: Path) -> Tokenizer:
        if not (path / TOKENIZER_FILE).is_file():
            return cls.converted(path)
        backend = Backend.from_file(str(path / TOKENIZER_FILE))
        backend.no_truncation()
        backend.no_padding()
        config: dict[str, Any] = {}
        for name in _CONFIG_FILES:
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text()))
        special = {}
        for role in _ROLES:
            token = config.get(f"{role}_token")
            if isinstance(token, dict):  # {"content": "<s>", "lstrip": ...}
                token = token.get("content")
            token_id = None if not isinstance(token, str) else backend.token_to_id(token)
            if token_id is not None:
                special[role] = token_id
        return cls(backend, special, bool(config.get("clean_up_tokenization_spaces", False)))

    @classmethod
    def converted(cls, path: Path) -> Tokenizer:
        """transformers' fast tokenizer for the checkpoint's class (no ``tokenizer.json``)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerMissing(f"{path}: no tokenizer.json, and no fast tokenizer for it")
        backend.no_truncation()
        backend.no_padding()
        special = {
            role: token_id
            for role in _ROLES
            if (token_id := getattr(hf, f"{role}_token_id", None)) is not None
        }
        return cls(backend, special, bool(getattr(hf, "clean_up_tokenization_spaces", False)))

    def id_of(self, role: str) -> int | None:
        """The id of a special token by its role (``cls``, ``eos``, ``pad``, ...), if any."""
        return self.special.get(role)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Encoding]:
        """Each text's encoding (ids, offsets, special-token mask), untruncated."""
        if not texts:
            return []
        return list(self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's piece for each id (``""`` for an id it lacks)."""
        return [self.backend.id_to_token(int(i)) or "" for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return _cleaned(text) if self.clean_up_spaces else text

    def special_tokens_to_add(self, pair: bool) -> int:
        return int(self.backend.num_special_tokens_to_add(pair))


def _cleaned(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
