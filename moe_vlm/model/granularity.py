"""Fine-grained expert sizes, as the model builds them. The arithmetic lives in
``moe_vlm.config.sizes`` so that config validation checks the very sizes the model uses
without importing model code; it is re-exported here, beside the layers that use it."""

from __future__ import annotations

from moe_vlm.config.sizes import MoESizes, fine_grained, resolve_moe_sizes

__all__ = ["MoESizes", "fine_grained", "resolve_moe_sizes"]
