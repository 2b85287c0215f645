"""``python -m moe_vlm.plot_routing`` = ``moe-vlm plot-routing``."""

from moe_vlm.commands import run_as_module

if __name__ == "__main__":
    run_as_module("plot-routing")
