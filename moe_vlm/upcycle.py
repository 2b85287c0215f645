"""``python -m moe_vlm.upcycle`` = ``moe-vlm upcycle``."""

import sys

from moe_vlm.checkpoints_cli import upcycle_main

if __name__ == "__main__":
    upcycle_main(sys.argv[1:])
