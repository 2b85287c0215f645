"""Generated answers (``moe_vlm.train.evaluate_generated``) agree answer by answer with the
teacher-forced exact match of ``evaluate``: greedy decoding reproduces an answer exactly
when the argmax is right at every answer position, the terminator included."""

from __future__ import annotations

import torch

from moe_vlm.config import load_config
from moe_vlm.data import build_data
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.sample import IGNORE_INDEX
from moe_vlm.generate import generate_ids
from moe_vlm.model import build_model
from moe_vlm.model.vlm import build_vlm
from moe_vlm.train.evaluate import answer_correct, evaluate
from moe_vlm.train.evaluate_generated import (
    evaluate_generated,
    generated_accuracy,
    generated_answers,
)

TOK = ByteTokenizer()


def _teacher_forced(model, samples) -> list[bool]:
    """Per answer (sample order, then answer order): ``answer_correct`` on that answer alone."""
    out = []
    for s in samples:
        with torch.no_grad():
            kw = {"pixel_values": s["pixel_values"]} if "pixel_values" in s else {}
            logits = model(s["input_ids"][None], **kw).logits
        for k in sorted(set(s["answer_ids"][s["answer_ids"] >= 0].tolist())):
            only = torch.where(s["answer_ids"] == k, k, -1)[None]
            c, t = answer_correct(logits, s["labels"][None], only)
            assert t == 1
            out.append(bool(c))
    return out


def _sample(turns: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """A chat-shaped sample from (prompt ids, answer ids incl. terminator) exchanges."""
    tokens, owner = [], []
    for k, (prompt, answer) in enumerate(turns):
        tokens += prompt + answer
        owner += [-1] * len(prompt) + [k] * len(answer)
    labels = [t if o >= 0 else IGNORE_INDEX for t, o in zip(tokens[1:], owner[1:])]
    return {"input_ids": torch.tensor(tokens[:-1]), "labels": torch.tensor(labels),
            "answer_ids": torch.tensor(owner[1:])}


def test_generated_answers_agree_with_teacher_forced_exact_match():
    """Right and wrong answers mixed: the terminator is chosen as a token the model emits,
    so that one question's truth is exactly its greedy answer (correct), others are not."""
    cfg = load_config(["vision=none", "data=synthetic_text", "model.init_std=0.3"])
    model = build_model(cfg.model, cfg.moe, cfg.routing, seed=0).eval()
    p0, p1, p2 = [1, 2, 3, 4], [9, 8, 7], [50, 60]
    g0 = generate_ids(model, [p0], None, 8)[0]
    k = next(i for i in range(1, 8) if g0[i] not in g0[:i])
    eos = g0[k]  # after g0[:k] the model says eos: p0's truth g0[:k] is reproduced
    g1 = generate_ids(model, [p1], None, 3)[0]
    samples = [
        _sample([(p0, g0[:k] + [eos])]),
        _sample([(p1, [g1[0], (g1[1] + 1) % 320, eos])]),  # wrong second token
        _sample([(p2, [eos]), (p0, g0[:k] + [eos])]),  # an empty answer, then a second turn
    ]
    answers = generated_answers(model, samples, eos, TOK.decode, batch_size=2)
    got = [a.correct for a in answers]
    assert got == _teacher_forced(model, samples)
    assert got[0] and not got[1] and True in got and False in got
    assert [(a.sample, a.answer) for a in answers] == [(0, 0), (1, 0), (2, 0), (2, 1)]
    assert answers[0].generated == g0[:k]
    assert generated_accuracy(answers)["gen_accuracy"] == sum(got) / 4


def test_vlm_generated_accuracy_equals_eval_accuracy():
    """On held-out synthetic_vlm questions (images spliced in the prompt), per-answer and in
    total the generated scoring equals ``evaluate``'s teacher-forced one."""
    cfg = load_config(["data.n_eval_samples=6", "model.init_std=0.3", "data.tokenizer=byte"])
    model = build_vlm(cfg, TOK.image_id, seed=0).eval()
    data = build_data(cfg.data, TOK, model.vision.cfg, model.n_image_tokens)
    samples = [data.eval[i] for i in range(len(data.eval))]
    answers = generated_answers(model, samples, TOK.eos_id, TOK.decode, TOK.pad_id, batch_size=5)
    assert answers and [a.correct for a in answers] == _teacher_forced(model, samples)
    res = evaluate_generated(model, data, TOK, batch_size=5)
    ev = evaluate(model, data, 4, torch.device("cpu"), None)
    assert res["gen_accuracy"] == ev["eval_accuracy"]
    for key, value in res.items():
        assert ev[key.replace("gen_", "eval_")] == value


def test_cli_eval_prints_generated_answers_and_accuracy(tmp_path, capsys):
    """``moe-vlm generate DIR --eval N`` on a VLM checkpoint directory: one line per
    held-out question and the accuracy the API computes."""
    from moe_vlm.commands import main
    from moe_vlm.commands.checkpoints import write_checkpoint_dir

    cfg = load_config(["data.n_eval_samples=4", "model.init_std=0.3", "data.tokenizer=byte"])
    model = build_vlm(cfg, TOK.image_id, seed=0).eval()
    write_checkpoint_dir(tmp_path / "ckpt", cfg, model.state_dict(), "note.json", {})
    data = build_data(cfg.data, TOK, model.vision.cfg, model.n_image_tokens)
    answers = generated_answers(model, [data.eval[i] for i in range(3)], TOK.eos_id, TOK.decode,
                                TOK.pad_id)
    main(["generate", str(tmp_path / "ckpt"), "--eval", "3"])
    out = capsys.readouterr().out.strip().split("\n")
    assert len(out) == len(answers) + 1 + len(set(a.answer_type for a in answers))
    a = answers[0]  # (sample 0 may be a caption, without questions)
    assert out[0] == (f"{'ok' if a.correct else '--'} {a.sample}:{a.answer} "
                      f"answer={a.generated_text!r} truth={a.truth_text!r}")
    acc = generated_accuracy(answers, data.answer_types)["gen_accuracy"]
    assert f"gen_accuracy: {acc:.4f}" in out
