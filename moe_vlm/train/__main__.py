"""``python -m moe_vlm.train [hydra overrides]`` == ``moe-vlm train [hydra overrides]``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("train")
