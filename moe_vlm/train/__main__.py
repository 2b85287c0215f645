"""``python -m moe_vlm.train [hydra overrides]`` == ``moe-vlm train [hydra overrides]``."""

import sys

from moe_vlm.cli import train_main

if __name__ == "__main__":
    train_main(sys.argv[1:])
