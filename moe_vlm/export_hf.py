"""``python -m moe_vlm.export_hf`` = ``moe-vlm export-hf``."""

import sys

from moe_vlm.checkpoints_cli import export_hf_main

if __name__ == "__main__":
    export_hf_main(sys.argv[1:])
