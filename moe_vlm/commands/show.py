"""``moe-vlm show RUN_DIR``: held-out scenes with each question, the model's greedy answer
and the truth, printed and drawn as a PNG grid (``moe_vlm.analysis.answers``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from moe_vlm.commands.checkpoints import _user_errors


def show_main(args: Sequence[str]) -> None:
    """Parse, load the run, answer the first N held-out samples, print, draw."""
    ap = argparse.ArgumentParser(prog="moe-vlm show", description=(
        "Answer the first N held-out samples of a trained run's data by greedy generation "
        "(KV cache) and show each question with the model's answer and the truth: printed, "
        "and as a PNG grid of the scenes (RUN_DIR/answers.png unless --out)."))
    ap.add_argument("run_dir", metavar="RUN_DIR")
    ap.add_argument("--n", type=int, default=8, help="held-out samples with questions (default 8)")
    ap.add_argument("--out", default=None, help="the PNG (default RUN_DIR/answers.png)")
    ap.add_argument("--cols", type=int, default=4, help="grid columns")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load a checkpoint that has no checksum file")
    ap.add_argument("overrides", nargs="*", help="key=value changes to the run's config")
    a = ap.parse_args(list(args))
    if a.n < 1:
        ap.error("--n must be at least 1")
    with _user_errors("moe-vlm show"):
        from moe_vlm.analysis.answers import as_text, group_answers, plot_grid
        from moe_vlm.generate.load import held_out_data, load_for_generation
        from moe_vlm.train.evaluate_generated import generated_accuracy, generated_answers

        model, tok, cfg = load_for_generation(a.run_dir, a.overrides, device=a.device,
                                              trust=a.trust_checkpoint)
        vlm = hasattr(model, "image_token_id")
        data = held_out_data(model, tok, cfg)
        samples, idx = [], 0
        while len(samples) < a.n and idx < len(data.eval):  # samples that ask something
            s = data.eval[idx]
            idx += 1
            if "answer_ids" in s and bool((s["answer_ids"] >= 0).any()):
                samples.append(s)
        if not samples:
            raise ValueError(f"data.name={cfg.data.name}: the held-out set has no "
                             "question/answer samples to show")
        answers = generated_answers(model, samples, tok.eos_id, tok.decode, tok.pad_id,
                                    v2pe_delta=cfg.data.v2pe_delta)
        mean, std = (cfg.vision.image_mean, cfg.vision.image_std) if vlm else ((), ())
        shown = group_answers(answers, samples, tok.decode, mean, std)
        acc = generated_accuracy(answers)
        out = Path(a.out) if a.out else Path(a.run_dir) / "answers.png"
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out}: give a .png path")
        title = f"{Path(a.run_dir).name}: {sum(x.correct for x in answers)}/{len(answers)} correct"
        plot_grid(shown, out, cols=a.cols, title=title)
    print(as_text(shown), end="")
    print(f"{sum(x.correct for x in answers)}/{len(answers)} answers correct "
          f"(gen_accuracy {acc.get('gen_accuracy', 0.0):.4f}); grid: {out}")
