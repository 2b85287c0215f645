"""Datasets behind one small interface, so the training loop does not care whether it
reads embedded text, embedded image-text scenes, or LLaVA-format data from disk.

A ``DataBundle`` gives deterministic training batches addressed by (step, micro-batch):
resuming needs no iterator state for map-style sources, and a multi-process run can take
its slice of the same global batch. Imports no model code.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from moe_vlm.config.schema import ConfigError, DataConfig, VisionConfig
from moe_vlm.data.sample import IGNORE_INDEX, collate
from moe_vlm.data.synthetic_text import SyntheticText
from moe_vlm.data.synthetic_vlm import SyntheticVLM, chance_accuracy
from moe_vlm.data.byte_tokenizer import ByteTokenizer


@dataclass
class DataBundle:
    train: Any  # map-style (indexable; unbounded or with __len__) or iterable-only (streaming)
    eval: Any  # indexable, with __len__
    tokenizer: Any
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] = collate
    chance_accuracy: Optional[float] = None  # of the eval questions, if it has any
    seed: int = 0
    corpus_stats: dict[str, int] = field(default_factory=dict)  # text corpora: skipped at tokenisation
    eval_parts: dict[str, Any] = field(default_factory=dict)  # a mixture: each source's held-out set
    _perm: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _stream: Optional[tuple[int, Iterator]] = field(default=None, repr=False)

    def _sample(self, g: int) -> dict[str, torch.Tensor]:
        """Global training sample ``g``: direct for unbounded sources, a fresh seeded
        permutation per epoch for finite ones, in order for streaming ones."""
        src = self.train
        if getattr(src, "streaming", False) or not hasattr(src, "__getitem__"):
            return self._stream_sample(g)
        try:
            n = len(src)
        except TypeError:  # unbounded synthetic stream
            return src[g]
        epoch, pos = divmod(g, n)
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(n, generator=gen)}
        return src[int(self._perm[epoch][pos])]

    def _stream_sample(self, g: int) -> dict[str, torch.Tensor]:
        # Streaming sources are read in order, epoch after epoch; jumping back (resume)
        # restarts the stream and skips ahead.
        if self._stream is None or self._stream[0] > g:
            self._stream = (0, iter(self.train))
        pos, it = self._stream
        while True:
            try:
                sample = next(it)
            except StopIteration:
                if pos == 0:
                    raise ValueError("the streaming training set yielded no usable sample") from None
                it = iter(self.train)
                continue
            if pos == g:
                self._stream = (pos + 1, it)
                return sample
            pos += 1

    def train_batch(self, step: int, micro: int, micro_batch_size: int,
                    batch_size: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of global step ``step``: global samples
        ``step*batch_size + micro*micro_batch_size + [0, micro_batch_size)``."""
        start = step * batch_size + micro * micro_batch_size
        return self.collate([self._sample(start + i) for i in range(micro_batch_size)])

    def stats(self, n_samples: Optional[int] = None) -> dict[str, int]:
        """Counters of skipped rows (missing/corrupt images, too long, malformed) and
        packing, summed over the train and eval sources that keep them; for a mixture
        also each source's samples among the first ``n_samples`` global samples."""
        out: dict[str, int] = dict(self.corpus_stats)
        if n_samples is not None and hasattr(self.train, "realised"):
            out.update(self.train.realised(n_samples))
        for src in (self.train, self.eval):
            for k, v in getattr(src, "stats", {}).items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1,
                     part: Optional[str] = None):
        """Held-out batches ``rank, rank + world, ...`` (all of them by default), so each of
        ``world`` processes reads and collates only its own share; of one source's held-out
        set with ``part`` (a mixture's ``eval_parts``)."""
        src = self.eval if part is None else self.eval_parts[part]
        n = len(src)
        for start in range(rank * batch_size, n, world * batch_size):
            yield self.collate([src[i] for i in range(start, min(n, start + batch_size))])


class PackedSource:
    """Iterable training source that packs the samples of ``source`` (one pass, in order,
    repeated per epoch by ``DataBundle``) into sequences of ``seq_len`` tokens holding at
    most ``max_images`` images each."""

    def __init__(self, source: Any, seq_len: int, max_images: int, pad_id: int):
        from moe_vlm.data.packing import Packer

        self.source = source
        self.packer = Packer(seq_len, max_images, pad_id)

    @property
    def stats(self) -> dict[str, int]:
        return {**getattr(self.source, "stats", {}), **self.packer.stats}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.packer.pack(iter(self.source))


def _synthetic_text(cfg: DataConfig, tokenizer, vision, n_image_tokens) -> DataBundle:
    return DataBundle(train=SyntheticText(cfg.seq_len, cfg.seed, "train"),
                      eval=SyntheticText(cfg.seq_len, cfg.seed, "eval", cfg.n_eval_samples),
                      tokenizer=tokenizer, seed=cfg.seed)


def _synthetic_vlm(cfg: DataConfig, tokenizer, vision, n_image_tokens) -> DataBundle:
    from moe_vlm.data.chat import render_conversation

    if vision is None:
        raise ConfigError("vision: data=synthetic_vlm needs a vision tower; pick vision=vit_tiny "
                          "(or another vision preset), or use data=synthetic_text")
    render = functools.partial(render_conversation, tokenizer=tokenizer,
                               n_image_tokens=n_image_tokens)
    args = (cfg.seq_len, cfg.seed)
    img = (vision.image_size, vision.image_mean, vision.image_std, render)
    ev = SyntheticVLM(*args, "eval", *img, n_samples=cfg.n_eval_samples)
    chance = chance_accuracy([t for i in range(len(ev)) for t in ev.question_types(i)])
    return DataBundle(train=SyntheticVLM(*args, "train", *img), eval=ev, tokenizer=tokenizer,
                      collate=functools.partial(collate, pad_id=tokenizer.pad_id),
                      chance_accuracy=chance, seed=cfg.seed)


def _llava(cfg: DataConfig, tokenizer, vision, n_image_tokens) -> DataBundle:
    from moe_vlm.data.llava import build_llava_sources

    if vision is None:
        raise ConfigError("vision: data=llava needs a vision tower (e.g. vision=hf "
                          "vision.hf_path=/path/to/siglip)")
    train, ev = build_llava_sources(cfg, tokenizer, n_image_tokens, vision.image_size,
                                    vision.image_mean, vision.image_std)
    if cfg.pack:
        train = PackedSource(train, cfg.seq_len, cfg.max_images_per_seq, tokenizer.pad_id)
    return DataBundle(train=train, eval=ev, tokenizer=tokenizer,
                      collate=functools.partial(collate, pad_id=tokenizer.pad_id), seed=cfg.seed)


def _corpus_files(cfg: DataConfig) -> tuple[list[Path], Optional[set[str]]]:
    """The files of ``data=text`` (``data.path``) or ``data=stdlib`` (the interpreter's
    standard library, with its fixed held-out files)."""
    from moe_vlm.data.text_corpus import discover, stdlib_files

    if cfg.name == "stdlib":
        return stdlib_files()
    return discover(cfg.path or ""), None


def _text(cfg: DataConfig, tokenizer, vision, n_image_tokens) -> DataBundle:
    from moe_vlm.data.text_corpus import TextCorpus, build_cache, default_cache_dir

    files, eval_files = _corpus_files(cfg)
    cache = build_cache(files, tokenizer, cfg.text_key,
                        Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                        workers=cfg.tokenize_workers)
    corpus = TextCorpus(cache, cfg.seq_len, cfg.eval_fraction, cfg.n_eval_samples, eval_files,
                        doc_ids=cfg.doc_mask)
    return DataBundle(train=corpus.train, eval=corpus.eval, tokenizer=tokenizer, seed=cfg.seed,
                      corpus_stats=corpus.stats)


def _mixture(cfg: DataConfig, tokenizer, vision, n_image_tokens) -> DataBundle:
    """``data.mixture`` {source: weight}: each source built as ``data=<source>`` with this
    config's other keys (seq_len, seed, path, tokenizer...), mixed by ``moe_vlm.data.mixture``."""
    from dataclasses import replace

    from moe_vlm.data.mixture import ConcatEval, MixtureTrain

    names = [n for n, w in cfg.mixture.items() if w > 0]  # weight 0: the source is off
    bundles = [DATASETS[n](replace(cfg, name=n, mixture={}), tokenizer, vision, n_image_tokens)
               for n in names]
    chance = [b.chance_accuracy for b in bundles if b.chance_accuracy is not None]
    return DataBundle(train=MixtureTrain(names, bundles, [cfg.mixture[n] for n in names], cfg.seed),
                      eval=ConcatEval([b.eval for b in bundles]), tokenizer=tokenizer,
                      collate=functools.partial(collate, pad_id=tokenizer.pad_id),
                      chance_accuracy=chance[0] if len(chance) == 1 else None, seed=cfg.seed,
                      corpus_stats=dict(sum((Counter(b.corpus_stats) for b in bundles), Counter())),
                      eval_parts={n: b.eval for n, b in zip(names, bundles)})


DATASETS: dict[str, Callable[..., DataBundle]] = {
    "synthetic_text": _synthetic_text, "synthetic_vlm": _synthetic_vlm, "llava": _llava,
    "text": _text, "stdlib": _text, "mixture": _mixture}


def build_data(cfg: DataConfig, tokenizer: Any = None, vision: Optional[VisionConfig] = None,
               n_image_tokens: int = 0) -> DataBundle:
    """The datasets of ``cfg``. Image-text sets need the vision config (image size and
    normalisation) and how many placeholder tokens an image takes in the decoder."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; choose one of {list(DATASETS)}")
    return DATASETS[cfg.name](cfg, tokenizer or ByteTokenizer(), vision, n_image_tokens)


def build_tokenizer_for(cfg: DataConfig, run_dir: Optional[Path] = None):
    """The run's tokenizer: byte-level, a BPE trained on the embedded corpus (saved in the
    run directory), or a local Hugging Face tokenizer directory."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    from moe_vlm.data.tokenizers import build_tokenizer
    corpus = None  # the embedded text corpus
    if cfg.tokenizer == "bpe" and cfg.name == "synthetic_vlm":
        from moe_vlm.data.synthetic_vlm import synthetic_vlm_corpus
        corpus = synthetic_vlm_corpus(cfg.seed)
    if cfg.tokenizer == "bpe" and cfg.name in ("text", "stdlib"):
        from moe_vlm.data.text_corpus import corpus_sample
        corpus = corpus_sample(*_corpus_files(cfg), cfg.text_key)
    return build_tokenizer(cfg, run_dir, corpus)


__all__ = ["ByteTokenizer", "DataBundle", "IGNORE_INDEX", "SyntheticText", "SyntheticVLM",
           "build_data", "build_tokenizer_for", "collate", "DATASETS"]
