"""Byte-level tokenizer: every byte is one token, so the vocabulary is exactly 256 symbols."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)


class ByteTokenizer:
    """Encodes text as its UTF-8 bytes and decodes byte tokens back to text."""

    vocab_size: int = 256

    def encode(self, text: str | bytes) -> list[int]:
        """Tokens 0..255 of `text` (strings are UTF-8 encoded first)."""
        return list(_as_bytes(text))

    def encode_tensor(self, text: str | bytes) -> torch.Tensor:
        """Tokens of `text` as an int64 tensor of shape (len,)."""
        return torch.tensor(self.encode(text), dtype=torch.int64)

    def decode(self, tokens: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of `tokens`; byte sequences that are not valid UTF-8 follow `errors`."""
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def decode_bytes(self, tokens: Iterable[int] | torch.Tensor) -> bytes:
        """Raw bytes of `tokens`; raises ValueError for a token outside 0..255."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        return bytes(tokens)


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")
