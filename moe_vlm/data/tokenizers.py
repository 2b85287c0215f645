"""Tokenizer factory: ``data.tokenizer`` = ``byte`` | ``bpe`` | ``hf``, one interface.

Every tokenizer returned here looks like ``ByteTokenizer``: ``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id``, ``image_id``, ``encode(text, bos=False, eos=False)`` and
``decode(ids)``. The model and the chat template only ever see that interface, so the
byte tokenizer (no files, no training) and a real subword tokenizer are interchangeable.

- ``byte``: UTF-8 bytes, ids 0..255 plus 4 specials (see ``byte_tokenizer.py``).
- ``bpe``: a byte-level BPE trained on the embedded synthetic corpus (or a given corpus)
  and saved as ``run_dir/tokenizer.json``, so a resumed run, eval and generation reuse
  the exact same ids instead of retraining.
- ``hf``: a local Hugging Face tokenizer directory (``data.tokenizer_path``); ``<image>``
  is added as a special token when absent, pad falls back to eos, bos may be absent.

Text never produces a special id: a literal ``"<image>"`` or ``"<eos>"`` inside a string
is tokenized as ordinary text, so special ids only ever come from the caller (``bos=``,
``eos=``, the chat template's image placeholders) and ``decode(encode(s)) == s``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Optional

from moe_vlm.config.schema import ConfigError, DataConfig
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.synthetic_text import synthetic_document
from moe_vlm.errors import DataError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
IMAGE_TOKEN = "<image>"
BPE_FILENAME = "tokenizer.json"
N_BPE_CORPUS_DOCS = 2000  # default BPE corpus size (synthetic documents); deterministic
TOKENIZER_KINDS = ("byte", "bpe", "hf")


def default_bpe_corpus(n_docs: int = N_BPE_CORPUS_DOCS) -> Iterable[str]:
    """The embedded corpus, seeded per document so it is identical on every run."""
    return (synthetic_document(random.Random(f"bpe/{i}")) for i in range(n_docs))


class BPETokenizer:
    """Byte-level BPE (``tokenizers`` library) behind the ``ByteTokenizer`` interface.

    Special ids are 0..3 (``<pad>``, ``<bos>``, ``<eos>``, ``<image>``); the 256 byte
    symbols are in the initial alphabet, so every string is representable and
    round-trips exactly.
    """

    def __init__(self, tok: Any):
        self._tok = tok
        # Literal "<image>" in user text must stay text, not become the placeholder id.
        self._tok.encode_special_tokens = True
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"BPE tokenizer lacks special tokens {SPECIAL_TOKENS}: got ids {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(ids)

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise ConfigError(f"data.bpe_vocab_size: must be >= {min_size} (256 byte symbols + "
                              f"{len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        """The run's saved tokenizer. A damaged file is a ``DataError`` that says to delete
        it: the next start then retrains it, identically from the same corpus."""
        from tokenizers import Tokenizer

        try:  # tokenizers raises a bare Exception for unreadable or wrongly shaped JSON
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - any failure here means the file is bad
            raise DataError(f"{path}: not a usable BPE tokenizer ({type(e).__name__}: {e}); it "
                            "is this run's saved tokenizer: delete it to have it retrained "
                            "(deterministic: the same corpus gives the same ids)") from e

    def save(self, path: Path) -> None:
        """Atomic: a killed run never leaves a half-written tokenizer.json behind."""
        from moe_vlm.atomic import atomic_write

        text = self._tok.to_str(pretty=True)
        atomic_write(Path(path), lambda f: f.write(text))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._special],
                                skip_special_tokens=True)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the ``ByteTokenizer`` interface.

    ``bos_id`` may be ``None`` (e.g. Qwen): then ``encode(bos=True)`` adds nothing.
    ``pad_id`` falls back to ``eos_id``: padded positions carry label -100 anyway.
    """

    def __init__(self, tok: Any, source: str = "?"):
        self._tok = tok
        if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
            tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]},
                                   replace_extra_special_tokens=False)
        self.image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
        if tok.eos_token_id is None:
            raise ConfigError(f"data.tokenizer_path: the tokenizer at {source} has no eos token; "
                              "answers need one to mark their end")
        self.eos_id = int(tok.eos_token_id)
        self.bos_id: Optional[int] = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)


def _load_hf(path: Optional[str]) -> HFTokenizer:
    if not path:
        raise ConfigError("data.tokenizer_path: data.tokenizer=hf needs a local tokenizer directory")
    from moe_vlm.data.json_rows import check_path

    check_path("data.tokenizer_path", path, want_dir=True)
    for f in (Path(path) / "tokenizer.json", Path(path) / "tokenizer_config.json"):
        if not f.is_file():  # name the broken file if it is not even JSON
            continue
        try:
            json.loads(f.read_bytes())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"data.tokenizer_path: {f} is not valid JSON ({e}); fix or replace "
                            "it, or point data.tokenizer_path at an intact tokenizer") from e
    from transformers import AutoTokenizer

    try:  # a damaged tokenizer.json surfaces as any of KeyError, TypeError, JSON errors, ...
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the directory is bad
        raise DataError(f"data.tokenizer_path: cannot load the tokenizer in {path} "
                        f"({type(e).__name__}: {e}); fix data.tokenizer_path or its files "
                        "(tokenizer.json, tokenizer_config.json)") from e
    return HFTokenizer(tok, source=str(path))


def build_tokenizer(cfg: DataConfig, run_dir: Path | None = None,
                    corpus: Iterable[str] | None = None) -> Any:
    """The tokenizer named by ``cfg.tokenizer``.

    ``bpe`` loads ``run_dir/tokenizer.json`` when present (resume, eval, generation) and
    otherwise trains on ``corpus`` (default: the embedded synthetic corpus) and saves it
    there; with ``run_dir=None`` it trains and saves nothing.
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        path = Path(run_dir) / BPE_FILENAME if run_dir is not None else None
        if path is not None and path.exists():
            return BPETokenizer.load(path)
        tok = BPETokenizer.train(default_bpe_corpus() if corpus is None else corpus,
                                 cfg.bpe_vocab_size)
        if path is not None:
            tok.save(path)
        return tok
    if cfg.tokenizer == "hf":
        return _load_hf(cfg.tokenizer_path)
    raise ConfigError(f"data.tokenizer: unknown tokenizer {cfg.tokenizer!r}; "
                      f"choose one of {list(TOKENIZER_KINDS)}")


__all__ = ["BPETokenizer", "HFTokenizer", "build_tokenizer", "default_bpe_corpus",
           "SPECIAL_TOKENS", "TOKENIZER_KINDS"]
