"""Invalid config values found by fuzzing: each is refused up front with one
``ConfigError`` line that names the key, never a traceback or a run that goes ahead.

- values (``validate``, through ``load_config``): non-finite floats, out-of-range
  numbers, absurd sizes;
- this machine (``check_runnable``): missing paths, absent hardware and packages, no
  DeepSpeed launcher, an unusable run directory;
- group presets (``check_group_overrides``): ``experiment=smok`` no longer runs the
  default job.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch

from moe_vlm.config import Config, ConfigError, apply_overrides, load_config
from moe_vlm.config import environment
from moe_vlm.config.environment import MissingPathError, check_runnable
from moe_vlm.config.groups import check_group_overrides, group_presets

TEXT = ["vision=none", "data=synthetic_text"]
LLAMA3 = ["model.rope_scaling=llama3"]


def _refused(fn, *args) -> str:
    """The one-line ``ConfigError`` message of ``fn(*args)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top-1 normalisation warnings are not the point
        with pytest.raises(ConfigError) as e:
            fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# (overrides, the key the message must start with) -- Part A: values, through Hydra.
VALUES = [
    # non-finite floats, anywhere (including float lists)
    (["train.lr=inf"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["routing.z_loss_coef=inf"], "routing.z_loss_coef"),
    (["routing.aux_loss_coef=inf"], "routing.aux_loss_coef"),
    (["train.weight_decay=inf"], "train.weight_decay"),
    (["routing.capacity_factor=inf"], "routing.capacity_factor"),
    (["model.rope_theta=nan"], "model.rope_theta"),
    (["upcycle.noise_std=nan"], "upcycle.noise_std"),
    (["train.grad_clip=-inf"], "train.grad_clip"),
    (["vision.image_mean=[0.5,nan,0.5]"], "vision.image_mean"),
    (["vision.image_std=[inf,0.5,0.5]"], "vision.image_std"),
    # out of range
    (["model.head_dim=0"], "model.head_dim"),
    (["model.head_dim=-16"], "model.head_dim"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.rope_theta=-10000"], "model.rope_theta"),
    (["model.norm_eps=0"], "model.norm_eps"),
    (["model.init_std=-0.02"], "model.init_std"),
    (["model.n_dense_layers=3"], "model.n_dense_layers"),
    (["model.rope_factor=0"], "model.rope_factor"),
    ([*LLAMA3, "model.rope_low_freq_factor=0"], "model.rope_low_freq_factor"),
    ([*LLAMA3, "model.rope_high_freq_factor=-4"], "model.rope_high_freq_factor"),
    ([*LLAMA3, "model.rope_original_max_len=0"], "model.rope_original_max_len"),
    (["train.beta1=1.0"], "train.beta1"),
    (["train.beta1=-0.1"], "train.beta1"),
    (["train.beta2=1.5"], "train.beta2"),
    (["train.eps=0"], "train.eps"),
    (["train.max_skipped_steps=-1"], "train.max_skipped_steps"),
    (["train.trainable=[]"], "train.trainable"),
    (["train.device=tpu"], "train.device"),
    (["train.device=cuda:x"], "train.device"),
    (["parallel.dp=0"], "parallel.dp"),
    (["upcycle.router_std=-0.1"], "upcycle.router_std"),
    (["data.bpe_vocab_size=100"], "data.bpe_vocab_size"),
    (["seed=-1"], "seed"),
    (["seed=4294967296"], "seed"),
    (["data.seed=-5"], "data.seed"),
    (["upcycle.seed=-1"], "upcycle.seed"),
    (["vision.patch_size=0"], "vision.patch_size"),
    (["vision.n_heads=0"], "vision.n_heads"),
    (["vision.image_size=0"], "vision.image_size"),
    (["vision.d_model=0"], "vision.d_model"),
    (["vision.n_layers=0"], "vision.n_layers"),
    (["vision.d_ff=0"], "vision.d_ff"),
    (["vision.norm_eps=0"], "vision.norm_eps"),
    (["vision.image_std=[0,0.5,0.5]"], "vision.image_std"),
    (["vision.image_std=[-0.5,0.5,0.5]"], "vision.image_std"),
    (["vision.select_layer=2"], "vision.select_layer"),
    (["vision.select_layer=-3"], "vision.select_layer"),
    (["vision.pos_emb=rope2d", "vision.d_model=24", "vision.n_heads=4"], "vision.pos_emb"),
    # absurd sizes: a bound or an estimate in bytes, not an allocation failure
    (["model.max_seq_len=2000000000"], "model.max_seq_len"),
    (["model.vocab_size=4000000000"], "model.vocab_size"),
    ([*TEXT, "model.vocab_size=1000000000", "model.d_model=4096", "model.n_heads=32",
      "model.n_kv_heads=8"], "model.vocab_size: the token embedding"),
    (["model.d_model=1000000", "model.n_heads=1000", "model.n_kv_heads=1000"], "model.d_model"),
    (["moe.n_experts=1000000", "moe.d_expert=1000000"], "moe.n_experts"),
    (["train.batch_size=100000000"], "train.batch_size: a micro-batch's logits"),
    (["model.n_layers=100000", "model.d_model=4096", "model.n_heads=32", "model.n_kv_heads=8"],
     "model.n_layers"),
    (["vision.image_size=4000000", "vision.patch_size=1"], "vision.image_size"),
]


@pytest.mark.parametrize("overrides, key", VALUES, ids=[" ".join(o) for o, _ in VALUES])
def test_invalid_value_is_one_line_naming_the_key(overrides, key):
    msg = _refused(load_config, overrides)
    assert msg.startswith(key), msg


def test_absurd_size_message_gives_the_estimate():
    msg = _refused(load_config, ["model.d_model=1000000", "model.n_heads=1000", "model.n_kv_heads=1000"])
    assert "bytes" in msg and "4e+12" in msg


# Part C: group presets. (overrides, the start of the message)
GROUPS_BAD = [
    (["experiment=smok"], "experiment=smok: no such preset; choose one of [align,"),
    (["experiment=nope"], "experiment=nope: no such preset"),
    (["+experiment=nope"], "experiment=nope: no such preset"),
    (["++experiment=nope"], "experiment=nope: no such preset"),
    (["model@decoder=nope"], "model=nope: no such preset; choose one of [large, medium, small, tiny]"),
    (["routing=mixtral_top2,nope"], "routing=nope: no such preset"),
    (["routing=[mixtral_top2,nope]"], "routing=nope: no such preset"),
    (["sweep=grnularity"], "sweep=grnularity: no such preset; choose one of [experts, granularity,"),
    (["train.lr=0.1", "vision=vit_huge"], "vision=vit_huge: no such preset"),
]


@pytest.mark.parametrize("overrides, says", GROUPS_BAD, ids=[" ".join(o) for o, _ in GROUPS_BAD])
def test_unknown_preset_is_refused_before_composing(overrides, says):
    msg = _refused(load_config, overrides)
    assert msg.startswith(says), msg


@pytest.mark.parametrize("overrides", [
    ["experiment=smoke"], ["experiment=null"], ["sweep=_base"], ["model=tiny", "model.d_model=64"],
    ["routing=mixtral_top2,deepseekmoe"], ["routing=choice(mixtral_top2,nope)"],
    ["experiment=${oc.env:EXP}"], ["~experiment"], ["hydra/launcher=basic"], ["experiment="],
])
def test_group_check_tolerates_valid_and_sweep_syntax(overrides):
    check_group_overrides(overrides)


def test_group_check_follows_moe_vlm_config_dir(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("defaults: []\n")
    (tmp_path / "model" / "mine.yaml").write_text("{}\n")
    monkeypatch.setenv("MOE_VLM_CONFIG_DIR", str(tmp_path))
    check_group_overrides(["model=mine"])
    assert group_presets("model") == ["mine"]
    msg = _refused(check_group_overrides, ["model=tiny"])
    assert msg.startswith("model=tiny: no such preset; choose one of [mine]") and str(tmp_path) in msg


# Part B: this machine. Paths are relative to a tmp dir holding file.txt, data.jsonl, dir/.
@pytest.fixture
def tmp_files(tmp_path, monkeypatch) -> Path:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def base() -> Config:
    return load_config()


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
ENV = [  # (overrides on the default config, the start of the message)
    (["train.init_from=nope"], "train.init_from: nope does not exist"),
    (["upcycle.method=copy", "upcycle.source=nope"], "upcycle.source: nope does not exist"),
    (["data.name=llava", "data.path=nope.jsonl", "model.max_seq_len=256", "data.seq_len=128"],
     "data.path: nope.jsonl does not exist"),
    (["data.name=llava", "data.path=dir"], "data.path: dir is not a file"),
    (["data.name=llava", "data.path=file.txt"], "data.path: file.txt is not a .json or .jsonl"),
    (["data.name=llava", "data.path=data.jsonl", "data.eval_path=nope.jsonl"], "data.eval_path"),
    (["data.image_dir=file.txt"], "data.image_dir: file.txt is not a directory"),
    (["data.image_dir=nope"], "data.image_dir: nope does not exist"),
    (["vision.name=hf", "vision.hf_path=file.txt"], "vision.hf_path: file.txt is not a directory"),
    (["data.tokenizer=hf", "data.tokenizer_path=nope"], "data.tokenizer_path: nope does not exist"),
    (["model.vocab_size=100", "data.tokenizer=byte"], "model.vocab_size: 100 is smaller than the byte tokenizer"),
    (["data.bpe_vocab_size=512"], "model.vocab_size: 320 is smaller than data.bpe_vocab_size=512"),
    (["train.trainable=[projector,wings]"], "train.trainable: unknown group(s) ['wings']"),
    pytest.param(["train.device=cuda"], "train.device: 'cuda' requested but CUDA", marks=NO_CUDA),
    pytest.param(["train.device=cuda:7"], "train.device: 'cuda:7'", marks=NO_CUDA),
    pytest.param(["moe.backend=triton"], "moe.backend: triton cannot run here", marks=NO_CUDA),
]


@pytest.mark.parametrize("overrides, says", ENV)
def test_not_runnable_here_is_one_line_naming_the_key(overrides, says, tmp_files, base):
    cfg = apply_overrides(base, overrides)
    msg = _refused(check_runnable, cfg, tmp_files / "run")
    assert msg.startswith(says), msg


def test_missing_path_is_also_file_not_found(tmp_files, base):
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        check_runnable(apply_overrides(base, ["train.init_from=nope"]), None)
    assert issubclass(MissingPathError, ConfigError)


def test_runnable_config_passes(tmp_files, base):
    check_runnable(base, tmp_files / "new" / "nested" / "run")
    check_runnable(apply_overrides(base, ["train.init_from=dir", "data.image_dir=dir",
                                          "data.name=llava", "data.path=data.jsonl"]), None)
    check_runnable(apply_overrides(base, ["moe.backend=torch", "model.moe_every=0",
                                          "train.device=cpu"]), tmp_files / "dir")


def test_device_outside_the_choices(base):
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, device="tpu"))
    msg = _refused(check_runnable, cfg, None)
    assert msg.startswith("train.device: unknown device 'tpu'") and "cuda:N" in msg and "mps" in msg


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_mps_without_mps(base):
    msg = _refused(check_runnable, apply_overrides(base, ["train.device=mps"]), None)
    assert msg.startswith("train.device: 'mps' requested")


def test_triton_under_the_interpreter_passes(base, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_runnable(apply_overrides(base, ["moe.backend=triton", "train.device=cpu"]), None)


def test_grouped_mm_needs_torch_grouped_mm(base, monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    msg = _refused(check_runnable, apply_overrides(base, ["moe.backend=grouped_mm"]), None)
    assert msg.startswith("moe.backend: grouped_mm cannot run here") and "_grouped_mm" in msg


def test_deepspeed_needs_the_package_and_a_launcher(base, monkeypatch):
    cfg = apply_overrides(base, ["parallel.engine=deepspeed"])
    for key in environment.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    present = {"deepspeed": True, "mpi4py": False}
    monkeypatch.setattr(environment, "_has_module", lambda name: present.get(name, True))
    msg = _refused(check_runnable, cfg, None)
    assert msg.startswith("parallel.engine: deepspeed needs a launcher") and "RANK" in msg
    for key, value in zip(environment.LAUNCHER_ENV, ("0", "1", "127.0.0.1", "29500", "0")):
        monkeypatch.setenv(key, value)  # what the deepspeed launcher and torchrun set
    check_runnable(cfg, None)
    present["deepspeed"] = False
    msg = _refused(check_runnable, cfg, None)
    assert msg.startswith("parallel.engine: deepspeed is not installed")


def test_run_dir_that_cannot_be_written(tmp_files, base, monkeypatch):
    assert _refused(check_runnable, base, tmp_files / "file.txt").startswith("run.dir: ")
    assert "is a file" in _refused(check_runnable, base, tmp_files / "file.txt" / "run")
    (tmp_files / "link").symlink_to(tmp_files / "gone")
    assert "dangling" in _refused(check_runnable, base, tmp_files / "link")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_files and real_access(p, mode))
    msg = _refused(check_runnable, base, tmp_files / "new" / "run")
    assert msg.startswith(f"run.dir: {tmp_files} (the nearest existing parent") and "not writable" in msg
