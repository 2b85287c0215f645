"""``python -m moe_vlm.fit`` = ``moe-vlm fit``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("fit")
