"""``python -m moe_vlm.export_hf`` = ``moe-vlm export-hf``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("export-hf")
