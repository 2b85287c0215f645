"""Datasets behind one small interface, so the training loop does not care whether it
reads embedded text, embedded image-text scenes, or LLaVA-format data from disk.

A ``DataBundle`` (``bundle.py``) gives deterministic training batches addressed by (step,
micro-batch): resuming needs no iterator state for map-style sources, and a multi-process
run can take its slice of the same global batch. ``build_data`` (``build.py``) makes the
bundle a ``DataConfig`` names. Imports no model code.
"""

from moe_vlm.data.build import DATASETS, build_data, build_tokenizer_for
from moe_vlm.data.bundle import DataBundle
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.sample import IGNORE_INDEX, collate
from moe_vlm.data.synthetic_text import SyntheticText
from moe_vlm.data.synthetic_vlm import SyntheticVLM

__all__ = ["ByteTokenizer", "DataBundle", "IGNORE_INDEX", "SyntheticText", "SyntheticVLM",
           "build_data", "build_tokenizer_for", "collate", "DATASETS"]
