"""``python -m moe_vlm.import_hf`` = ``moe-vlm import-hf``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("import-hf")
