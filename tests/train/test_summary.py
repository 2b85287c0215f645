"""``RunSummary``: the typed ``summary.json``. Optional keys stay out of the file until
they have a value (readers of older runs rely on absence), and a resume continues the
checkpoint's counters and results."""

from __future__ import annotations

from moe_vlm.train.summary import RESUMED, RunSummary


def _summary(**kw) -> RunSummary:
    kw.setdefault("parallel", {"world": 1, "dp": 1, "ep": 1, "engine": "torch"})
    return RunSummary(status="running", params_total=10, params_active=5, params_embedding=2,
                      params_trainable=10, flops_per_token=60.0, device="cpu",
                      precision="float32", expert_backend=None, config={}, **kw)


def test_optional_keys_are_absent_until_set_and_expert_backend_is_always_there():
    s = _summary()
    d = s.to_json()
    assert d["expert_backend"] is None  # a dense model: null, not absent
    assert not {"initial_eval_loss", "eval_accuracy", "error", "resumed_from"} & set(d)
    s.record_eval({"eval_loss": 2.0, "eval_accuracy": 0.5}, initial=True)
    s.record_eval({"eval_loss": 1.5})
    d = s.to_json()
    assert (d["initial_eval_loss"], d["initial_eval_accuracy"]) == (2.0, 0.5)
    assert (d["final_eval_loss"], d["eval_accuracy"]) == (1.5, 0.5)  # the last accuracy kept
    assert list(d)[:3] == ["status", "params_total", "params_active"]


def test_resume_continues_the_checkpoints_record():
    prior = _summary(tokens_seen=640, wall_time_s=3.0, skipped_steps=1, steps=5)
    prior.record_eval({"eval_loss": 2.0}, initial=True)
    prior.changed_on_resume = [{"key": "train.lr", "from": 1, "to": 2, "at_step": 3}]
    prior = prior.to_json()
    s = _summary(parallel={"world": 2, "dp": 2, "ep": 2, "engine": "torch"})
    s.resume(prior, 5, [{"key": "train.max_steps", "from": 5, "to": 9, "at_step": 5}])
    d = s.to_json()
    assert all(d.get(k) == prior[k] for k in RESUMED if k in prior and k != "changed_on_resume")
    assert [c["key"] for c in d["changed_on_resume"]] == ["train.lr", "train.max_steps"]
    assert d["resumed_from"] == 5 and d["resumed_from_layout"]["world"] == 1
    s2 = _summary()
    s2.resume(_summary().to_json(), 2, [])
    assert "changed_on_resume" not in s2.to_json() and "resumed_from_layout" not in s2.to_json()
