"""The datasets and tokenizer of a run from its ``DataConfig``: one builder per
``data.name`` (``DATASETS``), each returning a ``DataBundle``. Imports no model code."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from moe_vlm.config.schema import ConfigError, DataConfig, VisionConfig, v2pe_enabled
from moe_vlm.data.bundle import DataBundle
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.packing import PackedSource
from moe_vlm.data.sample import collate
from moe_vlm.data.synthetic_text import SyntheticText
from moe_vlm.data.synthetic_vlm import QUESTION_TYPES, SyntheticVLM, chance_accuracy
from moe_vlm.data.v2pe import V2PE


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
    train = SyntheticVLM(*args, "train", *img, count_after=cfg.count_questions_after)
    return DataBundle(train=train, eval=ev, tokenizer=tokenizer,
                      collate=functools.partial(collate, pad_id=tokenizer.pad_id),
                      chance_accuracy=chance, seed=cfg.seed, answer_types=list(QUESTION_TYPES))


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
                      answer_types=next((b.answer_types for b in bundles if b.answer_types), []),
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
    tokenizer = tokenizer or ByteTokenizer()
    bundle = DATASETS[cfg.name](cfg, tokenizer, vision, n_image_tokens)
    if v2pe_enabled(cfg) and n_image_tokens:
        bundle.v2pe = V2PE(tokenizer.image_id, n_image_tokens, cfg.v2pe_delta,
                           tuple(cfg.v2pe_train_deltas), cfg.seed)
    return bundle


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
