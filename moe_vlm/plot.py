"""``python -m moe_vlm.plot`` = ``moe-vlm plot``."""

import sys

from moe_vlm.analysis.commands import plot_main

if __name__ == "__main__":
    plot_main(sys.argv[1:])
