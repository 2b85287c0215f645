"""The console script's former module, kept so that an install whose ``moe-vlm`` script
still points at ``moe_vlm.cli:main`` keeps working. The commands live in ``moe_vlm.commands``."""

from moe_vlm.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
