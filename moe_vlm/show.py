"""``python -m moe_vlm.show`` = ``moe-vlm show``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("show")
