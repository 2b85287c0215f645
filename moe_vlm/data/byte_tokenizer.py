"""Byte-level tokenizer: needs no download and no training; every string round-trips."""

from __future__ import annotations


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes; then ``<pad>``, ``<bos>``, ``<eos>``, ``<image>``."""

    pad_id, bos_id, eos_id, image_id = 256, 257, 258, 259
    vocab_size = 260

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
