"""``python -m moe_vlm.fit`` = ``moe-vlm fit``."""

import sys

from moe_vlm.scaling.cli import fit_main

if __name__ == "__main__":
    fit_main(sys.argv[1:])
