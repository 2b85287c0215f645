"""moe-vlm show: held-out answers beside the truth, as text and as a PNG grid."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.analysis.answers import Shown, as_text, group_answers, last_question, plot_grid, to_rgb
from moe_vlm.commands import main
from moe_vlm.train import train
from moe_vlm.train.evaluate_generated import GeneratedAnswer

VLM = ["vision=vit_tiny", "data=synthetic_vlm", "data.seq_len=192", "model.max_seq_len=256", "train.max_steps=2", "train.eval_every=2",
       "train.ckpt_every=2"]


def test_question_of_a_chat_prompt():
    assert last_question("USER: <image>\nhow many shapes are there?\nASSISTANT:") == \
        "how many shapes are there?"
    two_turns = "USER: <image>\nis there a red circle?\nASSISTANT: yes\nUSER: what color is " \
        "the square?\nASSISTANT: "
    assert last_question(two_turns) == "what color is the square?"
    assert last_question("plain text") == "plain text"


def test_pixels_back_to_rgb():
    rgb = torch.rand(3, 4, 5)
    mean, std = [0.5, 0.4, 0.3], [0.5, 0.2, 0.1]
    norm = (rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    back = to_rgb(norm, mean, std)
    assert back.shape == (4, 5, 3)
    torch.testing.assert_close(torch.from_numpy(back), rgb.permute(1, 2, 0), atol=1e-6, rtol=0)


def test_grouping_text_and_grid(tmp_path):
    ans = [GeneratedAnswer(1, k, 0, [7, k], [1], [1 if k == 0 else 2], "yes", "yes" if k == 0 else "no")
           for k in range(2)] + [GeneratedAnswer(0, 0, 1, [9], [3], [3], "red", "red")]
    samples = [{"pixel_values": torch.zeros(1, 3, 8, 8)}, {}]
    shown = group_answers(ans, samples, lambda ids: f"USER: q{ids[-1]}?\nASSISTANT:", [0.5] * 3, [0.5] * 3)
    assert [s.sample for s in shown] == [1, 0]
    assert shown[0].image is None and shown[1].image.shape == (8, 8, 3)
    assert shown[0].qa == [("q0?", "yes", "yes", True), ("q1?", "no", "yes", False)]
    text = as_text(shown)
    assert "[ok] q0?  ->  'yes'" in text and "[--] q1?  ->  'no'  (truth 'yes')" in text
    out = plot_grid(shown, tmp_path / "g.png", cols=2, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to show"):
        plot_grid([], tmp_path / "h.png")
    assert isinstance(shown[0], Shown)


def test_show_command_on_a_trained_vlm(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(*VLM), run_dir)
    main(["show", str(run_dir), "--n", "2", "--out", str(tmp_path / "a.png")])
    out = capsys.readouterr().out
    assert out.count("sample ") == 2 and "answers correct (gen_accuracy" in out
    n_ok, n_all = out.count("[ok]"), out.count("[ok]") + out.count("[--]")
    assert f"{n_ok}/{n_all} answers correct" in out
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # a .txt output is refused (exit 2, one line)
        main(["show", str(run_dir), "--out", str(tmp_path / "a.txt")])
    assert "give a .png path" in capsys.readouterr().err


def test_show_refuses_a_run_without_questions(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "text"
    train(tiny_config("train.max_steps=1"), run_dir)
    with pytest.raises(SystemExit):
        main(["show", str(run_dir)])
    assert "no question/answer samples" in capsys.readouterr().err
