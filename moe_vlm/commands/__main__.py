"""``python -m moe_vlm.commands <command> [args]`` = ``moe-vlm <command> [args]``."""

from moe_vlm.commands import main

if __name__ == "__main__":
    main()
