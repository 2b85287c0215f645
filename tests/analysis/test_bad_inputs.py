"""Bad input to the results, plot and checkpoint commands ends in one clear line (or, for
a results table, an ``invalid`` row), never a traceback: run directories whose files have
the wrong shape, malformed routing rows, truncated or garbage Hugging Face weights,
config.json sizes that cannot be built, shard names that leave the model directory, and
``--out`` paths under a regular file. Everything runs in process on tiny files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml
from safetensors.torch import load_file

from moe_vlm.analysis.modality import modality_load
from moe_vlm.analysis.results import collect_results
from moe_vlm.commands import main
from moe_vlm.errors import CheckpointError, ConfigError, DataError, RunDirError, UserError
from test_results import make_run  # tiny run directories (this folder)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``moe-vlm ARGS`` in process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(args: list[str], capsys, match: str) -> str:
    """Run a command that must fail with exit 2 and exactly one stderr line naming it."""
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"moe-vlm {args[0]}: "), err
    assert match in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- results table

def _write(d: Path, name: str, text: str) -> None:
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)


GOOD_CFG = yaml.safe_dump({"seed": 0, "moe": {"granularity": 1}})
BAD_RUNS = {  # case -> (files of the bad run directory, expected piece of its error)
    "summary_list": ({"summary.json": "[1, 2]"}, "summary.json: expected a JSON object, got list"),
    "summary_number": ({"summary.json": "5"}, "summary.json: expected a JSON object, got int"),
    "summary_not_json": ({"summary.json": '{"status": '}, "summary.json: unreadable"),
    "steps_string": ({"summary.json": '{"status": "completed", "steps": "x"}'},
                     "'steps' should be a number, got 'x'"),
    "params_string": ({"summary.json": '{"status": "completed", "params_total": "1k", '
                                       '"params_embedding": 2}'}, "'params_total' should be a number"),
    "config_number": ({"summary.json": '{"status": "completed", "config": 3}'},
                      "'config' should be a mapping, got int"),
    "status_number": ({"summary.json": '{"status": 3}'}, "'status' should be a string"),
    "config_yaml_list": ({"config.yaml": "[1, 2]", "metrics.jsonl": ""},
                         "config.yaml: expected a mapping, got list"),
    "config_yaml_broken": ({"config.yaml": "a: [1", "metrics.jsonl": ""}, "config.yaml: unreadable"),
    "metrics_row_list": ({"config.yaml": GOOD_CFG, "metrics.jsonl": '{"step": 0}\n[1, 2]\n'},
                         "metrics.jsonl line 2: expected a JSON object, got list"),
    "metrics_step_string": ({"config.yaml": GOOD_CFG, "metrics.jsonl": '{"step": "x"}\n'},
                            "'step' should be an integer"),
    "overrides_mapping": ({"config.yaml": GOOD_CFG, "metrics.jsonl": "",
                           ".hydra/overrides.yaml": "a: 1"}, ".hydra/overrides.yaml: expected a list"),
}


def bad_sweep(root: Path, files: dict[str, str]) -> Path:
    """Two completed runs (g1, g2) and one run directory ``bad`` holding ``files``."""
    make_run(root, "g1", "completed", 1, 0.9)
    make_run(root, "g2", "completed", 2, 0.8)
    for name, text in files.items():
        _write(root / "bad", name, text)
    return root


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_dir_is_an_invalid_row(case, tmp_path, capsys):
    files, error = BAD_RUNS[case]
    root = bad_sweep(tmp_path / "sweep", files)
    df = collect_results(root)
    assert list(df["run"]) == ["bad", "g1", "g2"]
    assert list(df["status"]) == ["invalid", "completed", "completed"]
    assert error in df.loc[df.run == "bad", "error"].item()
    assert list(df["moe.granularity"].iloc[1:]) == [1, 2]  # the good runs are intact
    code, out, err = run_cli(["results", str(root)], capsys)
    assert code == 0 and "3 runs: 2 completed, 1 invalid" in out
    assert err.strip() == f"moe-vlm results: bad: invalid run directory: " \
                          f"{df.loc[df.run == 'bad', 'error'].item()}"


@pytest.mark.parametrize("kind", ["curves", "final", "isoflop"])
def test_plots_skip_invalid_rows(kind, tmp_path, capsys):
    root = bad_sweep(tmp_path / "sweep", BAD_RUNS["summary_list"][0])
    if kind == "isoflop":  # one budget, three sizes: enough for a profile
        for i, n in enumerate((400, 1600, 6400)):
            run = make_run(root, f"iso{i}", "completed", 1, 2 + abs(i - 1) * 0.1)
            s = json.loads((run / "summary.json").read_text())
            s.update(params_active=n + 100, params_embedding=100, tokens_seen=1e10 / (6 * n))
            (run / "summary.json").write_text(json.dumps(s))
    extra = ["--key", "moe.granularity"] if kind == "final" else []
    code, out, err = run_cli(["plot", str(root), "--kind", kind, *extra,
                              "--out", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert err.strip().startswith("skipped 1 invalid run directory (first: bad: summary.json")


def test_parquet_table_with_mixed_value_types(tmp_path, capsys):
    """A run that logged ``device: 3`` (another logged ``"cpu"``) must not stop the
    Parquet table from being written: mixed columns are written as strings."""
    import pandas as pd

    root = bad_sweep(tmp_path / "sweep", {"summary.json": json.dumps(
        {"status": "completed", "device": 3, "config": {"moe": {"granularity": "x"}}})})
    s = json.loads((root / "g1" / "summary.json").read_text())
    (root / "g1" / "summary.json").write_text(json.dumps({**s, "device": "cpu"}))
    code, _, err = run_cli(["results", str(root), "--out", str(tmp_path / "t.parquet")], capsys)
    assert code == 0, err
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert list(back["device"].fillna("-")) == ["3", "cpu", "-"]
    assert list(back["moe.granularity"]) == ["x", "1", "2"]


def test_results_and_plot_out_under_a_file(tmp_path, capsys):
    root = bad_sweep(tmp_path / "sweep", {})
    (tmp_path / "f").write_text("")
    one_error_line(["results", str(root), "--out", str(tmp_path / "f" / "t.csv")], capsys,
                   f"{tmp_path / 'f'} is a file, not a directory")
    one_error_line(["plot", str(root), "--kind", "curves", "--out", str(tmp_path / "f" / "p.png")],
                   capsys, "is a file, not a directory")


# --------------------------------------------------------------------------- routing rows

def routing(n_exp: int = 2, img: list | None = None, txt: list | None = None) -> dict:
    img = [1.0] * n_exp if img is None else img
    txt = [2.0] * n_exp if txt is None else txt
    return {"layer_0": {"tokens_per_expert": [3.0] * n_exp, "tokens_per_expert_image": img,
                        "tokens_per_expert_text": txt}}


GOOD_ROW = json.dumps({"step": 1, "routing": routing()})
MALFORMED_ROWS = {  # case -> a metrics.jsonl line that must be skipped as malformed
    "row_list": "[1, 2]",
    "row_number": "7",
    "not_json_mid_file": '{"step": 2, "rout',
    "routing_list": json.dumps({"step": 2, "routing": [1, 2]}),
    "routing_empty": json.dumps({"step": 2, "routing": {}}),
    "layer_not_object": json.dumps({"step": 2, "routing": {"layer_0": 5}}),
    "layer_bad_name": json.dumps({"step": 2, "routing": {"first": {"tokens_per_expert_image": [1]}}}),
    "counts_string": json.dumps({"step": 2, "routing": routing(img=["a", 1])}),
    "counts_negative": json.dumps({"step": 2, "routing": routing(img=[-1, 1])}),
    "text_missing": json.dumps({"step": 2, "routing": {"layer_0": {"tokens_per_expert_image": [1, 1]}}}),
    "lengths_differ": json.dumps({"step": 2, "routing": routing(img=[1, 1, 1])}),
    "expert_count_changes": json.dumps({"step": 2, "routing": routing(n_exp=3)}),
}


@pytest.mark.parametrize("case", list(MALFORMED_ROWS))
def test_plot_routing_skips_malformed_rows(case, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(
        [GOOD_ROW, MALFORMED_ROWS[case], json.dumps({"step": 3, "eval_loss": 1.0}), GOOD_ROW]) + "\n")
    load = modality_load(run)
    assert load["layer_0"].tolist() == [[2.0, 2.0], [4.0, 4.0]]  # the two good rows only
    assert "skipped 1 malformed row(s) (first: line 2:" in capsys.readouterr().err
    code, out, err = run_cli(["plot-routing", str(run), "--out", str(tmp_path / "m.png")], capsys)
    assert code == 0 and (tmp_path / "m.png").is_file()
    assert err.count("skipped 1 malformed row(s)") == 1


@pytest.mark.parametrize("lines,match", [
    (list(MALFORMED_ROWS.values())[:-1], "has no usable per-modality routing rows (11 malformed"),
    ([json.dumps({"step": 1, "eval_loss": 2.0})], "has no per-modality routing rows"),
    ([], "has no per-modality routing rows"),
    (None, "metrics.jsonl does not exist"),
])
def test_plot_routing_without_usable_rows(lines, match, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if lines is not None:
        (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises((DataError, FileNotFoundError), match=match.replace("(", r"\(")):
        modality_load(run)
    one_error_line(["plot-routing", str(run)], capsys, match)


def test_expert_load_plot_skips_malformed_rows(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(f"{GOOD_ROW}\n{MALFORMED_ROWS['routing_list']}\n{GOOD_ROW}\n")
    code, _, err = run_cli(["plot", str(run), "--kind", "load", "--out", str(tmp_path / "l.png")],
                           capsys)
    assert code == 0 and "skipped 1 malformed row(s)" in err
    (run / "metrics.jsonl").write_text(f"{MALFORMED_ROWS['routing_list']}\n")
    one_error_line(["plot", str(run), "--kind", "load"], capsys, "has no usable routing rows")


# --------------------------------------------------------------------------- import-hf

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A dense Llama checkpoint directory (config.json + model.safetensors), exported
    from our own tiny model: no transformers model to build."""
    from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
    from moe_vlm.model.decoder import build_model
    from moe_vlm.upcycling.hf import export_hf

    m = ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=48, max_seq_len=64, moe_every=0)
    net = build_model(m, MoEConfig(), RoutingConfig())
    return export_hf(net.state_dict(), m, MoEConfig(), RoutingConfig(),
                     tmp_path_factory.mktemp("hf") / "llama")


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def garbage_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all")


def shard_index(shard: str | Callable[[Path], str]) -> Callable[[Path], None]:
    """Sharded layout whose index points every tensor at ``shard`` (or what it returns)."""
    def edit(d: Path) -> None:
        keys = list(load_file(str(d / "model.safetensors")))
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        name = shard(d) if callable(shard) else shard
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: name for k in keys}}))
    return edit


def symlink_out(d: Path) -> str:
    outside = d.parent / f"{d.name}-outside.safetensors"
    shutil.copy(d / "model-00001-of-00001.safetensors", outside)
    os.symlink(outside, d / "link.safetensors")
    return "link.safetensors"


def _size_cases() -> list:
    keys = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "vocab_size", "num_key_value_heads", "max_position_embeddings", "head_dim"]
    return [pytest.param(edit_config(**{k: v}), ConfigError, f"{k}={v} must be a positive integer",
                         id=f"{k}={v}") for k in keys for v in (0, -4)]


HF_CASES = [
    pytest.param(truncate, CheckpointError, "model.safetensors: cannot read the weights", id="truncated"),
    pytest.param(lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage"), CheckpointError,
                 "model.safetensors: cannot read the weights", id="garbage_safetensors"),
    pytest.param(garbage_bin, CheckpointError, "pytorch_model.bin: refused by torch.load", id="garbage_bin"),
    *_size_cases(),
    pytest.param(edit_config(hidden_size="32"), ConfigError, "hidden_size='32' must be a positive integer",
                 id="size_string"),
    pytest.param(edit_config(rms_norm_eps=-1), ConfigError, "rms_norm_eps=-1 must be a positive number",
                 id="eps_negative"),
    pytest.param(edit_config(tie_word_embeddings="yes"), ConfigError, "tie_word_embeddings='yes'",
                 id="tie_string"),
    pytest.param(edit_config(num_key_value_heads=3), ConfigError, "num_key_value_heads=3 must be a divisor",
                 id="kv_heads_not_divisor"),
    pytest.param(edit_config(rope_parameters={"rope_type": "linear"}), ConfigError,
                 "rope_parameters.factor=None", id="rope_without_factor"),
    pytest.param(lambda d: (d / "config.json").write_text("{nope"), ConfigError,
                 "config.json: not valid JSON", id="config_garbage"),
    pytest.param(lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"), ConfigError,
                 "config.json: not valid JSON", id="config_binary"),
    pytest.param(lambda d: (d / "config.json").write_text("[1, 2]"), ConfigError,
                 "config.json: expected a JSON object, got list", id="config_list"),
    pytest.param(shard_index("../outside.safetensors"), CheckpointError,
                 "weights shard '../outside.safetensors' is outside the model directory", id="shard_dotdot"),
    pytest.param(shard_index("/etc/passwd"), CheckpointError,
                 "weights shard '/etc/passwd' is outside the model directory", id="shard_absolute"),
    pytest.param(shard_index(symlink_out), CheckpointError,
                 "weights shard 'link.safetensors' resolves to", id="shard_symlink_out"),
    pytest.param(shard_index(lambda d: 3), CheckpointError, "weight_map holds 3", id="shard_not_a_name"),
]


@pytest.mark.parametrize("edit,error,match", HF_CASES)
def test_import_hf_bad_checkpoint(edit, error, match, tiny_hf, tmp_path, capsys):
    from moe_vlm.upcycling.hf import import_hf

    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    edit(d)
    with pytest.raises(error) as info:
        import_hf(d)
    assert match in str(info.value) and str(d) in str(info.value)  # names the file
    line = one_error_line(["import-hf", "--from", str(d), "--out", str(tmp_path / "out")], capsys, match)
    assert not (tmp_path / "out").exists(), line


@pytest.mark.parametrize("edit,match", [
    (truncate, "model.safetensors: cannot read the weights"),
    (edit_config(hidden_size=-1), "hidden_size=-1 must be a positive integer"),
    (shard_index("../outside.safetensors"), "is outside the model directory"),
])
def test_upcycle_from_a_bad_hf_checkpoint(edit, match, tiny_hf, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    edit(d)
    one_error_line(["upcycle", "--from", str(d), "--method", "copy", "--out", str(tmp_path / "o"),
                    "moe.n_experts=2"], capsys, match)


def test_sharded_index_inside_the_folder_still_loads(tiny_hf, tmp_path):
    from moe_vlm.upcycling.hf import import_hf

    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    shard_index("model-00001-of-00001.safetensors")(d)
    assert set(import_hf(d).state_dict) == set(import_hf(tiny_hf).state_dict)


def test_hub_cache_snapshot_symlinks_still_load(tiny_hf, tmp_path):
    """The Hugging Face hub cache keeps files in ``<repo>/blobs`` and links them from
    ``<repo>/snapshots/<rev>/``: those symlinks out of the folder are the one kind allowed."""
    from moe_vlm.upcycling.hf import import_hf

    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    shutil.copy(tiny_hf / "config.json", snap / "config.json")
    shutil.copy(tiny_hf / "model.safetensors", blobs / "f00d")
    os.symlink("../../blobs/f00d", snap / "model-00001-of-00001.safetensors")
    keys = list(load_file(str(tiny_hf / "model.safetensors")))
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    assert set(import_hf(snap).state_dict) == set(import_hf(tiny_hf).state_dict)


MOE_BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)


@pytest.mark.parametrize("hf_type,key,value,match", [
    ("mixtral", "num_local_experts", 0, "num_local_experts=0 must be a positive integer"),
    ("mixtral", "num_experts_per_tok", -1, "num_experts_per_tok=-1 must be a positive integer"),
    ("qwen3_moe", "num_experts", -2, "num_experts=-2 must be an integer >= 0"),
    ("qwen3_moe", "moe_intermediate_size", 0, "moe_intermediate_size=0 must be a positive integer"),
    ("qwen3_moe", "decoder_sparse_step", 0, "decoder_sparse_step=0 must be a positive integer"),
    ("qwen3_moe", "mlp_only_layers", "x", "mlp_only_layers='x' must be a list of layer indices"),
    ("dots1", "n_routed_experts", -1, "n_routed_experts=-1 must be a positive integer"),
    ("dots1", "n_shared_experts", -1, "n_shared_experts=-1 must be an integer >= 0"),
    ("dots1", "routed_scaling_factor", 0, "routed_scaling_factor=0 must be a positive number"),
])
def test_moe_config_sizes(hf_type, key, value, match):
    from moe_vlm.upcycling.hf_import import configs_from_hf

    raw = {**MOE_BASE, "model_type": hf_type, "num_experts": 4, "num_local_experts": 4,
           "n_routed_experts": 4, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
           "n_shared_experts": 1, "norm_topk_prob": True, key: value}
    if key == "num_experts":
        raw.pop("num_local_experts")  # an alias transformers also reads
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        configs_from_hf(raw, "m/config.json")


# --------------------------------------------------------------------------- --out paths

@pytest.mark.parametrize("cmd", [["import-hf"], ["upcycle", "--method", "copy"]])
@pytest.mark.parametrize("out,match", [
    ("f/sub/x", "is a file, not a directory"),
    ("f", "is a file; choose a new directory"),
    ("full", "exists and is not empty"),
])
def test_out_that_cannot_be_a_directory(cmd, out, match, tiny_hf, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_error_line([*cmd, "--from", str(tiny_hf), "--out", str(tmp_path / out)], capsys, match)


@pytest.mark.parametrize("error,line", [
    (NotADirectoryError(20, "Not a directory", "/a/b"), "p: /a/b: Not a directory"),
    (PermissionError(13, "Permission denied", "/root/x"), "p: /root/x: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/tmp"), "p: /tmp: Is a directory"),
    (RunDirError("run.dir busy"), "p: run.dir busy"),
    (UserError("plain"), "p: plain"),
    (CheckpointError("x.pt: damaged"), "p: x.pt: damaged"),
])
def test_user_errors_are_one_line(error, line, capsys):
    from moe_vlm.commands.checkpoints import _user_errors

    with pytest.raises(SystemExit) as info:
        with _user_errors("p"):
            raise error
    assert info.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_user_errors_keep_bugs(capsys):
    from moe_vlm.commands.checkpoints import _user_errors

    with pytest.raises(KeyError):
        with _user_errors("p"):
            raise KeyError("a bug")


# --------------------------------------------------------------------------- fit

@pytest.mark.parametrize("text,match", [
    ("a,b\n1,2\n", "missing column(s)"),
    ("[1, 2]\n", "missing column(s)"),
    ('status,params_active,tokens_seen,final_eval_loss\n"completed,1,1,2\n', "not a readable CSV"),
    ("status,params_active,tokens_seen,final_eval_loss\ncompleted,x,1,2\n", "non-numeric"),
    ("status,params_active,tokens_seen,final_eval_loss\ninvalid,,,\n", "no completed runs"),
])
def test_fit_on_a_table_of_the_wrong_shape(text, match, tmp_path, capsys):
    (tmp_path / "t.csv").write_text(text)
    one_error_line(["fit", str(tmp_path / "t.csv"), "--law", "chinchilla"], capsys, match)
