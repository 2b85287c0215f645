"""``python -m moe_vlm.results`` = ``moe-vlm results``."""

import sys

from moe_vlm.analysis.commands import results_main

if __name__ == "__main__":
    results_main(sys.argv[1:])
