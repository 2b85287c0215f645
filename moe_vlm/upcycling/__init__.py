"""Upcycling dense checkpoints into MoE models, and moving checkpoints to and from
Hugging Face.

- ``methods``: one dense FFN -> routed experts + router + shared expert (copy, split with
  virtual groups, drop, noise) and which combinations preserve the dense function;
- ``upcycle``: ``upcycle_into(model, dense_state, UpcycleConfig)`` for a whole decoder or
  VLM, following the target's MoE schedule;
- ``grow``: a dense model's state dict -> a wider / deeper dense one (bert2BERT FPI,
  identity or G_stack layers), before upcycling (AquilaMoE's scale-up, then scale-out);
- ``btx``: ``btx_merge_into(model, branch_states)``: Branch-Train-MiX, N dense branches of
  one seed -> one MoE (expert e = branch e's FFN, every other tensor the mean);
- ``source``: ``load_checkpoint(path)`` reads one of our runs or a local HF directory;
- ``hf``: ``import_hf`` / ``export_hf`` between our models and transformers' Llama, Qwen2,
  Qwen3, Qwen3-MoE, Mixtral and dots1 formats.
"""

from moe_vlm.upcycling.btx import BTXReport, btx_merge_into
from moe_vlm.upcycling.hf import HFImport, export_hf, hf_class_for, import_hf, read_hf_checkpoint
from moe_vlm.upcycling.methods import METHODS, preserves_function, upcycle_ffn
from moe_vlm.upcycling.source import Checkpoint, load_checkpoint
from moe_vlm.upcycling.upcycle import UpcycleReport, upcycle_into

__all__ = ["BTXReport", "METHODS", "Checkpoint", "HFImport", "UpcycleReport", "btx_merge_into",
           "export_hf", "hf_class_for", "import_hf", "load_checkpoint", "preserves_function", "read_hf_checkpoint",
           "upcycle_ffn", "upcycle_into"]
