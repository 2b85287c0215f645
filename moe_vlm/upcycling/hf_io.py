"""Hugging Face checkpoint files: read ``config.json`` + weights, write them atomically,
and the tensor names each supported ``model_type`` uses on disk.

Legend: L layers, D model width, F MLP / expert width, E routed experts.

Reading accepts ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` (``torch.load(weights_only=True)``)
and sharded ``.bin`` with ``pytorch_model.bin.index.json``, in that order of preference.
A weights file that cannot be read (truncated, not safetensors, a pickle that holds more
than tensors) raises ``CheckpointError`` naming it; an index whose shard names leave the
model directory (``../x``, an absolute path, a symlink out) is refused, never followed;
a ``config.json`` that is not a JSON object raises ``ConfigError`` naming the file.
Writing produces one ``model.safetensors`` (``{"format": "pt"}`` metadata, which older
transformers versions insist on) next to ``config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from moe_vlm.errors import CheckpointError, ConfigError

PathLike = Union[str, Path]

# model_type -> architecture class written into config.json
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "dots1": "Dots1ForCausalLM",
}
DENSE_TYPES = ("llama", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen3_moe", "dots1")

# Per MoE model_type, the legacy per-expert layout: (block name, gate, up, down) so that
# expert e of layer i is ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight``.
# transformers 5 keeps the fused ``model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, D]``
# (gate rows first, then up; not interleaved) and ``...experts.down_proj [E, D, F]`` in
# memory, converts the legacy layout on load and writes the legacy layout back on save.
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "dots1": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")  # dense and shared-expert SwiGLU
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older versions saved; recomputed


def aux_coef_to_hf(aux_loss_coef: float, n_moe_layers: int, top_k: int) -> float:
    """Our ``routing.aux_loss_coef`` -> transformers' ``router_aux_loss_coef``, so that
    both weight the balance loss alike: ``coef * n_moe_layers / top_k``.

    Ours (``routing.balancing.switch_aux_loss``) is, per MoE layer l,
    ``a_l = E * sum_e f_le * P_le`` with ``f_le`` the fraction of the layer's T*K
    assignments on expert e and ``P_le`` its mean router probability, and the model adds
    ``coef * sum_l a_l``. transformers' ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE)
    pools the router logits of all L MoE layers first and counts tokens, not assignments:
    ``E * sum_e F_e * Q_e`` with ``F_e = sum_l K f_le / L`` (its per-expert fractions sum
    to K) and ``Q_e = sum_l P_le / L``. When every layer routes alike (one MoE layer,
    identical layers, or perfect balance, where a_l = 1 and HF's loss is K) that is
    ``K * a``, while ours is ``coef * L * a``: hence ``coef * L / K``. Otherwise pooling
    makes HF's loss a product of layer means instead of a mean of per-layer products, so
    the two agree in scale, not exactly. Only the micro-batch scope has an HF equivalent
    (``routing.aux_loss_scope`` sequence / global_batch balance other token sets); dots1
    in transformers computes no balance loss and carries the key only for the round trip.
    """
    return aux_loss_coef * n_moe_layers / top_k if n_moe_layers else aux_loss_coef


def aux_coef_from_hf(router_aux_loss_coef: float, n_moe_layers: int, top_k: int) -> float:
    """transformers' ``router_aux_loss_coef`` -> our ``routing.aux_loss_coef``: the
    inverse of ``aux_coef_to_hf``, ``coef * top_k / n_moe_layers`` (equal weight when the
    layers route alike, the same scale otherwise)."""
    return router_aux_loss_coef * top_k / n_moe_layers if n_moe_layers else router_aux_loss_coef


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def plain_names(n_layers: int, schedule: list[bool], hf_type: str, qk_norm: bool,
                qkv_bias: bool, tie_embeddings: bool) -> dict[str, str]:
    """Our state-dict key -> HF key, for every tensor that maps one to one (same shape)."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    for i in range(n_layers):
        ours, p = f"layers.{i}.", layer_prefix(i)
        names[ours + "attn_norm.weight"] = p + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = p + "post_attention_layernorm.weight"
        for w, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{ours}attn.{w}.weight"] = f"{p}self_attn.{h}.weight"
            if qkv_bias and w != "wo":
                names[f"{ours}attn.{w}.bias"] = f"{p}self_attn.{h}.bias"
        if qk_norm:
            names[ours + "attn.q_norm.weight"] = p + "self_attn.q_norm.weight"
            names[ours + "attn.k_norm.weight"] = p + "self_attn.k_norm.weight"
        if schedule[i]:
            block = EXPERT_NAMES[hf_type][0]
            names[ours + "ffn.router.weight"] = f"{p}{block}.gate.weight"
            if hf_type == "dots1":
                names[ours + "ffn.router.bias"] = f"{p}mlp.gate.e_score_correction_bias"
    return names


def _read_json(f: Path, error: type[ValueError] = ConfigError) -> dict:
    """A JSON object from ``f``; ``error`` (naming the file) if it is anything else."""
    try:
        with open(f, encoding="utf-8") as h:
            data = json.load(h)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise error(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _unreadable(f: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{f}: cannot read the weights ({_first_line(e)}); the file may be "
                           f"truncated or not a checkpoint: download it again")


def _load_safetensors(f: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(f, e) from None


def _load_bin(f: Path) -> dict[str, Tensor]:
    """A pickled state dict read with ``weights_only=True``: a pickle that needs anything
    but tensors (code could run) is refused as untrusted, like a damaged file."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # "pickle protocol N" notes before the real error
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the reason follows "WeightsUnpickler error:"
        why = str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        why = " ".join(why.split())[:200] or _first_line(e)
        raise CheckpointError(f"{f}: refused by torch.load(weights_only=True): not a plain "
                              f"state dict of tensors, or damaged ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _unreadable(f, e) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: expected a flat state dict of tensors")
    return sd


def _shard_path(index: Path, shard: object) -> Path:
    """The file a ``weight_map`` entry names, which must lie inside the model directory:
    an absolute name, ``..`` or a symlink out would read files the index's author chose.
    The one exception is the Hugging Face hub cache, where ``snapshots/<rev>/<file>`` are
    symlinks to ``../../blobs/<hash>`` of the same repository."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map holds {shard!r}, not a shard file name")
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise CheckpointError(f"{index}: weights shard {shard!r} is outside the model "
                              f"directory {index.parent}; refusing to read it")
    f = index.parent / shard
    home = index.parent.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":  # hub cache: <repo>/snapshots/<rev> -> <repo>/blobs
        allowed.append(home.parent.parent / "blobs")
    target = f.resolve()
    if not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index}: weights shard {shard!r} resolves to {target}, outside "
                              f"the model directory {index.parent}; refusing to read it")
    return f


def _read_sharded(index: Path, load) -> dict[str, Tensor]:
    """All tensors of a sharded checkpoint; every key the index lists must be in its shard,
    and every shard inside the model directory (``_shard_path``)."""
    weight_map = _read_json(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        _shard_path(index, shard)  # refuse a bad entry before reading any shard
        by_shard.setdefault(shard, []).append(key)
    out: dict[str, Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        f = _shard_path(index, shard)
        if not f.is_file():
            raise FileNotFoundError(f"weights shard {f} (listed in {index.name}) does not exist")
        tensors = load(f)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{f}: lacks {missing[:5]} (listed in {index.name}"
                                  f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''})")
        out.update(tensors)
    return out


def read_hf_checkpoint(path: PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json as a dict, {HF key: tensor on CPU, dtype as stored})`` of a local
    Hugging Face checkpoint directory. Reads every tensor into memory (costs the whole
    checkpoint's size in host RAM). Raises FileNotFoundError naming what is missing."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {d} does not exist")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} does not exist")
    config = _read_json(d / "config.json")
    if (d / "model.safetensors").is_file():
        return config, _load_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        return config, _read_sharded(d / "model.safetensors.index.json", _load_safetensors)
    if (d / "pytorch_model.bin").is_file():
        return config, _load_bin(d / "pytorch_model.bin")
    if (d / "pytorch_model.bin.index.json").is_file():
        return config, _read_sharded(d / "pytorch_model.bin.index.json", _load_bin)
    present = sorted(p.name for p in d.iterdir())
    raise FileNotFoundError(f"no weights in {d}: expected model.safetensors, "
                            f"model.safetensors.index.json with its shards, or "
                            f"pytorch_model.bin; found {present}")


def _own_storage(t: Tensor) -> Tensor:
    """A contiguous CPU tensor with storage of its own: safetensors refuses tensors that
    share memory, such as the gate / up halves of one ``w_in`` (copies only such views)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous():
        return t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def write_hf_checkpoint(out_dir: PathLike, config: dict, tensors: dict[str, Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` atomically: into a
    temporary directory beside it, then one rename. Refuses a non-empty ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; "
                              f"choose a new output directory or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        flat = {k: _own_storage(v) for k, v in tensors.items()}
        save_file(flat, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "config.json", "w") as h:
            json.dump(config, h, indent=2, sort_keys=True)
            h.write("\n")
        os.replace(tmp, out)  # atomic; replaces an empty directory on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
