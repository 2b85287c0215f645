"""The ``moe-vlm`` console script: one table of subcommands, one module per family.

    train.py        train (Hydra overrides)
    checkpoints.py  upcycle, import-hf, export-hf: checkpoint directories in and out
    grow.py         grow: a dense checkpoint -> a wider / deeper dense one
    btx.py          btx: Branch-Train-MiX merge of dense branch runs into an MoE
    analysis.py     results, plot, plot-routing: run directories read back
    scaling.py      fit: scaling laws on a results table
    generate.py     generate: answers from a trained model
    show.py         show: held-out answers beside the truth, printed and as a PNG grid

``moe-vlm <name> ARGS`` and ``python -m moe_vlm.<module>`` (two-line shims, e.g.
``moe_vlm/plot_routing.py``) both run ``COMMANDS[name]``; a handler's module is imported
only when it runs, so ``moe-vlm --help`` imports neither torch nor Hydra. A ``UserError``
becomes ``moe-vlm <name>: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

HELP_COLUMN = 28  # where the help text starts in the usage


@dataclass(frozen=True)
class Command:
    """One subcommand: its handler (``module:function``, called with the argument list)
    and what ``moe-vlm --help`` says of it."""

    handler: str
    synopsis: str  # the arguments after the name
    help: str  # one line (a long one wraps onto a few)

    def run(self, args: Sequence[str]) -> None:
        module, name = self.handler.split(":")
        getattr(importlib.import_module(module), name)(args)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "moe_vlm.commands.train:train_main", "[hydra overrides]",
        "train a model (default: tiny MoE on embedded data, CPU)\n"
        "e.g. moe-vlm train model=small routing=deepseek_v3 train.max_steps=50\n"
        "add --cfg job to print the resolved config, -m for a multirun sweep,\n"
        "--help to list every config key and preset"),
    "plot-routing": Command(
        "moe_vlm.commands.analysis:plot_routing_main", "RUN_DIR [--out PNG] [--last N]",
        "per-layer expert x modality (image/text) load heatmap of a VLM run"),
    "upcycle": Command(
        "moe_vlm.commands.checkpoints:upcycle_main",
        "--from SRC --method {copy,split,drop,noise} --out DIR [--trust-checkpoint] [key=value ...]",
        "dense checkpoint (ours or a local HF Llama/Qwen2/Qwen3) -> MoE"),
    "generate": Command(
        "moe_vlm.commands.generate:generate_main",
        "RUN_DIR (--prompt TEXT [--image PATH] ... | --eval N) [--max-new-tokens N] ...",
        "ask a trained model: KV-cached generation (greedy, top-k/top-p sampling,\n"
        "stop strings, batched prompts, image prompts); --eval N: held-out answers"),
    "grow": Command(
        "moe_vlm.commands.grow:grow_main",
        "--from SRC --out DIR [--width fpi] [--depth {identity,stack}] model.KEY=VALUE ...",
        "dense checkpoint -> wider/deeper dense one (bert2BERT FPI, identity or\n"
        "G_stack layers), to train or upcycle (AquilaMoE's scale-up, then scale-out)"),
    "btx": Command(
        "moe_vlm.commands.btx:btx_main",
        "--from RUN_A RUN_B [...] --out DIR [--trust-checkpoint] [key=value ...]",
        "Branch-Train-MiX: dense branches of one seed -> MoE (experts = branch FFNs)"),
    "show": Command(
        "moe_vlm.commands.show:show_main", "RUN_DIR [--n N] [--out PNG]",
        "held-out scenes with each question, the model's answer and the truth\n"
        "(greedy generation), printed and drawn as a PNG grid"),
    "import-hf": Command(
        "moe_vlm.commands.checkpoints:import_hf_main", "--from HF_DIR --out DIR",
        "local Hugging Face checkpoint -> our checkpoint directory"),
    "results": Command(
        "moe_vlm.commands.analysis:results_main", "ROOT [--out TABLE.csv]",
        "one row per run directory under ROOT (config, metrics, status)"),
    "plot": Command(
        "moe_vlm.commands.analysis:plot_main",
        "ROOT --kind {curves,final,load,isoflop} [--key K] [--out PNG]",
        "sweep figures: loss curves, final loss vs a key, expert load, IsoFLOP"),
    "fit": Command(
        "moe_vlm.commands.scaling:fit_main", "TABLE.csv --law {chinchilla,krajewski,clark} [--out DIR]",
        "fit a scaling law (with bootstrap CIs) to a results table"),
    "export-hf": Command(
        "moe_vlm.commands.checkpoints:export_hf_main", "--from CKPT_DIR --out HF_DIR [--trust-checkpoint]",
        "our checkpoint -> Hugging Face directory (Qwen3-MoE, Mixtral, dots1,\n"
        "Llama, Qwen2, Qwen3) that transformers loads"),
}


def usage() -> str:
    """``moe-vlm --help``: every command of ``COMMANDS`` with its synopsis and help."""
    lines = ["usage: moe-vlm <command> [args]", "", "commands:"]
    for name, c in COMMANDS.items():
        head, *rest = c.help.split("\n")
        call = f"  {name} {c.synopsis}"
        if len(call) < HELP_COLUMN - 1:
            lines.append(call.ljust(HELP_COLUMN) + head)
        else:
            lines += [call, " " * HELP_COLUMN + head]
        lines += [" " * HELP_COLUMN + r for r in rest]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``moe-vlm <command> [args]`` (``argv`` default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"moe-vlm: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from moe_vlm.errors import UserError

    try:
        COMMANDS[cmd].run(rest)
    except UserError as e:  # expected problems with the user's input: one line, exit 2
        print(f"moe-vlm {cmd}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_as_module(name: str) -> None:
    """``python -m moe_vlm.<module> ARGS``: the same as ``moe-vlm <name> ARGS``."""
    main([name, *sys.argv[1:]])
