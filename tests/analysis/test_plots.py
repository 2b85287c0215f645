"""Sweep plots write PNGs from run directories and tables, and refuse what they cannot draw."""

from __future__ import annotations

import json

import pytest

from moe_vlm.analysis import plots
from moe_vlm.commands.analysis import plot_main
from moe_vlm.analysis.results import collect_results

from test_results import make_run  # noqa: E402  (tests/analysis is on sys.path via rootdir)

PNG = b"\x89PNG"


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    routing = {"layer_0": {"tokens_per_expert": [5, 1, 1, 1]}, "layer_1": {"tokens_per_expert": [2, 2, 2, 2]}}
    for g, loss in ((1, 0.9), (2, 0.8)):
        make_run(root, f"g{g}", "completed", g, loss, metrics=[
            {"step": 0, "eval_loss": 5.0},
            {"step": 5, "loss": 3.0, "routing": routing},
            {"step": 10, "loss": 2.0, "eval_loss": loss, "routing": routing}])
    make_run(root, "g4", "failed", 4)
    return root


def test_curves_final_and_load(sweep, tmp_path):
    for path in (plots.plot_loss_curves(sweep, tmp_path / "c.png"),
                 plots.plot_final_vs_key(collect_results(sweep), "moe.granularity", tmp_path / "f.png"),
                 plots.plot_expert_load(sweep / "g1", tmp_path / "l.png")):
        assert path.read_bytes()[:4] == PNG
    load = plots.expert_load(sweep / "g1")
    assert load["layer_0"].tolist() == pytest.approx([5 / 8, 1 / 8, 1 / 8, 1 / 8])


def test_plot_errors(sweep, tmp_path):
    with pytest.raises(ValueError, match="no column 'moe.nope'"):
        plots.plot_final_vs_key(collect_results(sweep), "moe.nope", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no routing rows"):
        make_run(tmp_path, "dense", "completed", 1)
        plots.plot_expert_load(tmp_path / "dense", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no run logged 'accuracy'"):
        plots.plot_loss_curves(sweep, tmp_path / "x.png", metric="accuracy")


def test_isoflop_plot_from_a_grid(tmp_path):
    """Runs on a 3-budget x 3-size grid drawn from a known law get parabolas and minima."""
    root = tmp_path / "grid"
    i = 0
    for c in (1e12, 4e12, 1.6e13):
        for n in (c ** 0.5 / 200 * f for f in (0.25, 1.0, 4.0)):
            d = c / (6 * n)
            loss = 1.7 + 400 / n ** 0.34 + 400 / d ** 0.28
            run = make_run(root, f"r{i}", "completed", 1, loss)
            s = json.loads((run / "summary.json").read_text())
            s.update(params_active=n + 100, params_embedding=100, tokens_seen=d)
            (run / "summary.json").write_text(json.dumps(s))
            i += 1
    out = plots.plot_isoflop(collect_results(root), tmp_path / "iso.png")
    assert out.read_bytes()[:4] == PNG


def test_plot_command(sweep, tmp_path, capsys):
    plot_main([str(sweep), "--kind", "final", "--key", "moe.granularity", "--out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").is_file()
    with pytest.raises(SystemExit):
        plot_main([str(sweep), "--kind", "final"])
    assert "needs --key" in capsys.readouterr().err
