"""Refuse config-group overrides that name no preset (``experiment=smok``).

``configs/config.yaml`` lists ``optional experiment: null`` and ``optional sweep: null``,
and Hydra skips an *optional* group whose file is missing, so a typo such as
``experiment=smok`` silently ran the default job. ``check_group_overrides`` looks each
``GROUP=NAME`` up before Hydra composes anything and names the presets that exist. It is
called by ``load_config`` and meant for every entry point that hands overrides to Hydra
(``moe-vlm train``, including ``-m`` multiruns).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from moe_vlm.errors import ConfigError

__all__ = ["check_group_overrides", "group_presets"]

# A preset name as written on the command line: letters, digits, _ - . and / (subfolders).
# Anything else (choice(...), range(...), ${...}, quotes) is Hydra syntax we leave to Hydra.
_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")


def _search_roots(overrides: Sequence[str]) -> list[Path] | None:
    """Where config groups live: ``config_dir()``, ``experiments_dir()`` (group ``sweep``)
    and any ``file://`` entry of a ``hydra.searchpath=[...]`` override. None when a
    search path entry is not a plain directory (``pkg://``): then we cannot know every
    preset and leave the lookup to Hydra."""
    from moe_vlm.config.loader import config_dir, experiments_dir

    roots = [config_dir(), experiments_dir()]
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key != "hydra.searchpath":
            continue
        for entry in value.strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if not entry:
                continue
            if not entry.startswith("file://"):
                return None
            roots.append(Path(entry[len("file://"):]))
    return roots


def group_presets(group: str, roots: Iterable[Path] | None = None) -> list[str]:
    """The preset names of config group ``group`` (``model``, ``sweep``, ...), sorted;
    names starting with ``_`` are shared bases (``sweep/_base``), left out."""
    if roots is None:
        roots = _search_roots(()) or []
    names = {p.stem for root in roots for p in (Path(root) / group).glob("*.yaml")}
    return sorted(n for n in names if not n.startswith("_"))


def _names(value: str) -> list[str] | None:
    """The preset names in an override's value: ``a``, ``a,b`` (multirun) or ``[a,b]``;
    None for Hydra sweep functions, interpolations or quoted values (not checked)."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    names = [n.strip() for n in value.split(",")]
    if not all(_PLAIN.fullmatch(n) for n in names):
        return None
    return names


def check_group_overrides(overrides: Sequence[str]) -> None:
    """Raise ``ConfigError`` for a ``GROUP=NAME`` override (also ``+GROUP``, ``++GROUP``,
    ``GROUP@pkg``, ``GROUP=a,b``) whose ``NAME.yaml`` does not exist in that group.

    Only plain names are checked; ``null`` (no preset) is accepted, as are sweep
    functions like ``choice(a,b)``. Keys that are not groups (``model.d_model=64``) are
    left to the schema."""
    roots = _search_roots(overrides)
    if roots is None:
        return
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue  # deletions and bare words are Hydra's to judge
        key, _, value = override.lstrip("+").partition("=")
        group = key.split("@", 1)[0]
        if not group or "." in group or not any((r / group).is_dir() for r in roots):
            continue
        names = _names(value)
        for name in names or ():
            if name == "null" or any((r / group / f"{name}.yaml").is_file() for r in roots):
                continue
            where = next(r for r in roots if (r / group).is_dir())
            raise ConfigError(
                f"{group}={name}: no such preset; choose one of "
                f"[{', '.join(group_presets(group, roots))}] (looked for {group}/{name}.yaml "
                f"in {where})")
