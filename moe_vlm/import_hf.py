"""``python -m moe_vlm.import_hf`` = ``moe-vlm import-hf``."""

import sys

from moe_vlm.checkpoints_cli import import_hf_main

if __name__ == "__main__":
    import_hf_main(sys.argv[1:])
