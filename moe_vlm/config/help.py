"""``moe-vlm train --help``: every config key with its type, its value in the job the
overrides compose (the default job without any) and a one-line doc.

The docs are the comments written beside (or just above) each field in
``moe_vlm/config/schema.py``, read from its source at run time, so the schema stays the
one place a key is documented and a new field documents itself with the comment it gets
anyway (``tests/config/test_help.py`` refuses a field without one).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
import warnings
from functools import lru_cache
from typing import Any, Sequence

from moe_vlm.config.schema import Choice, Config

WIDTH = 100  # wrap long docs here
GROUPS = ("model", "vision", "routing", "moe", "data", "train", "parallel", "experiment", "sweep")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` of a schema dataclass: the comment block right above a field and the
    comment at the end of its line, joined on one line. Empty where the source cannot be
    read (an install without ``.py`` files); ``# noqa``/``# type:`` pragmas are skipped."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    src = textwrap.dedent("".join(lines))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole-line comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith(("noqa", "type:")):
            comments[tok.start[0]] = (text, tok.line.lstrip().startswith("#"))
    docs = {}
    for node in ast.parse(src).body[0].body:  # type: ignore[attr-defined] - a ClassDef
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, at = [], node.lineno - 1
            while at in comments and comments[at][1]:
                above.insert(0, comments[at][0])
                at -= 1
            end = node.end_lineno or node.lineno
            trailing = [comments[n][0] for n in range(node.lineno, end + 1)
                        if n in comments and not comments[n][1]]
            docs[node.target.id] = " ".join(above + trailing)
    return docs


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key as ``--help`` lists it."""

    key: str  # dotted: routing.top_k
    type: str  # int, float | null, {softmax_topk,sigmoid_topk,expert_choice}, ...
    value: Any  # in the composed config
    doc: str


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, Choice):
        return "{" + ",".join(tp.values()) + "}"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + " | null"
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def config_keys(cfg: Any = None, prefix: str = "") -> list[Key]:
    """Every leaf key of the schema, in schema order, with its value in ``cfg`` (default:
    the schema's own defaults)."""
    cfg = Config() if cfg is None else cfg
    hints, docs, out = typing.get_type_hints(type(cfg)), field_docs(type(cfg)), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(Key(f"{prefix}{f.name}", _type_name(hints[f.name]), value,
                           docs.get(f.name, "")))
    return out


def _compose(overrides: Sequence[str]) -> tuple[Any, dict[str, str], str]:
    """(config, group choices, a note): the job ``overrides`` compose, or the schema's
    defaults and why, if they do not compose."""
    from hydra import compose, initialize_config_dir

    from moe_vlm.config.groups import check_group_overrides
    from moe_vlm.config.loader import config_dir, register_schema, searchpath_override, to_config

    try:
        check_group_overrides(overrides)
        register_schema()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # validation's advice is for runs, not for help
            dcfg = compose(config_name="config", overrides=[searchpath_override(), *overrides],
                           return_hydra_config=True)
            choices = {g: str(c) for g, c in dcfg.hydra.runtime.choices.items() if g in GROUPS}
            return to_config(dcfg), choices, ""
    except Exception as e:  # noqa: BLE001 - help still lists the keys, with the reason
        note = f"(these overrides do not compose: {' '.join(str(e).split())}; showing the schema's defaults)"
        return Config(), {}, note


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    return text.split(". ", 1)[0].rstrip(".") + "." if text else ""


def render_help(overrides: Sequence[str] = ()) -> str:
    """The text of ``moe-vlm train [overrides] --help``."""
    from moe_vlm.config.groups import group_presets
    from moe_vlm.config.loader import config_dir, experiments_dir

    cfg, choices, note = _compose(overrides)
    job = "these overrides'" if overrides else "the default job's"
    roots = [config_dir(), experiments_dir()]
    out = ["usage: moe-vlm train [GROUP=PRESET ...] [KEY=VALUE ...] [-m] [--cfg job]", "",
           f"Presets, GROUP=PRESET (* = {job}; moe follows the routing preset's name unless given):"]
    for g in GROUPS:
        names = [f"{n}*" if choices.get(g) == n else n for n in group_presets(g, roots)]
        out.append(textwrap.fill(f"  {g}: {', '.join(names)}", WIDTH, subsequent_indent=" " * 6))
    out += ["", f"Keys, KEY=VALUE: KEY (type) = {job} value  -- what it does"]
    if note:
        out.append(textwrap.fill(note, WIDTH))
    section = None
    for k in config_keys(cfg):
        head = k.key.split(".", 1)[0] if "." in k.key else ""
        if head != section:
            section = head
            doc = _first_sentence(inspect.getdoc(type(getattr(cfg, head))) or "") if head else ""
            out += ["", f"{head or '(top level)'}: {doc}".rstrip()]
        line = f"  {k.key} ({k.type}) = {_show(k.value)}"
        out.append(textwrap.fill(f"{line}  -- {k.doc}" if k.doc else line, WIDTH,
                                 subsequent_indent=" " * 6, break_on_hyphens=False))
    return "\n".join(out)
