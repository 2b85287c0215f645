"""Config files we read must not run code.

Hydra instantiates ``_target_`` nodes it is given control of (``hydra.callbacks``, a
launcher or sweeper), and Python's logging config (``hydra.job_logging``) calls any
``()`` factory or handler ``class``. A config directory someone shares (an upcycled
checkpoint directory trained with ``--config-path DIR``) could use either to execute
code on ``moe-vlm train``. Our configs never need them, so every YAML file in the
directories a command reads is checked first, with PyYAML's safe loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from moe_vlm.errors import ConfigError

_CODE_KEYS = ("_target_", "()")
_HYDRA_CODE_NODES = ("callbacks", "job_logging", "hydra_logging", "launcher", "sweeper")
_HYDRA_DEFAULTS = tuple(f"hydra/{n}" for n in _HYDRA_CODE_NODES)
# Hydra's own bundled choices for those groups (plain logging/launch configs).
_BUILTIN_CHOICES = ("default", "disabled", "none", "stdout", "basic")


def _walk(node: Any, path: str) -> Iterable[str]:
    """Dotted paths of every node that could make Hydra or logging call code."""
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if k in _CODE_KEYS:
                yield key
            elif path == "hydra" and k in _HYDRA_CODE_NODES and k != "sweeper":  # params: data
                yield key
            elif k == "defaults" and isinstance(v, list):
                for entry in v:
                    items = entry.items() if isinstance(entry, dict) else [(entry, None)]
                    for name, choice in items:
                        name = str(name).lstrip("+").removeprefix("override ").strip()
                        if name.startswith(_HYDRA_DEFAULTS) and choice not in _BUILTIN_CHOICES:
                            yield f"{key}: {name}: {choice}"
            else:
                yield from _walk(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def check_config_dirs(dirs: Iterable[str | Path]) -> None:
    """Raise ``ConfigError`` naming the file and key if any YAML file under ``dirs`` has
    a node that makes Hydra or logging instantiate something (``_target_``, ``()``,
    ``hydra.callbacks`` / ``job_logging`` / ``hydra_logging`` / ``launcher``, or such a
    defaults entry). ``hydra.sweeper.params`` (our sweeps) is plain data and allowed; a
    sweeper ``_target_`` is not."""
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("*.yaml")) + sorted(d.rglob("*.yml")):
            try:
                docs = list(yaml.safe_load_all(f.read_text(errors="replace")))
            except (yaml.YAMLError, OSError) as e:
                raise ConfigError(f"{f}: not a readable YAML file ({str(e).splitlines()[0]})") from None
            for doc in docs:
                found = list(_walk(doc, ""))
                if found:
                    raise ConfigError(
                        f"{f}: {found[0]} would make Hydra run code (callbacks, logging "
                        "factories and _target_ instantiation are refused in configs moe-vlm "
                        "reads); remove it from the file")

