"""``moe-vlm generate RUN_DIR --prompt TEXT [--image PATH] ...``: ask a trained model
(``moe_vlm.generate``) and print each answer on its own line (a prompt and its answer,
``--show-prompt``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from moe_vlm.commands.checkpoints import _user_errors


def generate_main(args: Sequence[str]) -> None:
    """Parse, load the run, generate, print."""
    ap = argparse.ArgumentParser(prog="moe-vlm generate", description=(
        "Answer prompts with a trained model (a run directory, a checkpoint directory or a "
        "run's checkpoints/step_*.pt), decoding with a KV cache. A run trained on chat data "
        "(synthetic_vlm, llava) gets its prompts in the training chat template (USER: ... "
        "ASSISTANT:), a text run has them continued as they are (--chat / --raw to choose); "
        "an --image is placed as in training. Greedy by default; --temperature > 0 samples "
        "under --seed."))
    ap.add_argument("run_dir", metavar="RUN_DIR")
    ap.add_argument("--prompt", action="append", default=[],
                    help="a prompt; repeat for a batch")
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="instead of prompts: answer the questions of the first N held-out "
                         "samples greedily, print each answer beside the truth and the "
                         "accuracy (gen_accuracy, per question type)")
    ap.add_argument("--image", action="append", default=None,
                    help="an image file for the prompt in the same position (one per --prompt, "
                         "or one for a single prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    ap.add_argument("--seed", type=int, default=0)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_const", const=True, default=None,
                      help="wrap prompts in the chat template (default for chat-trained runs)")
    mode.add_argument("--raw", dest="chat", action="store_const", const=False,
                      help="continue the prompt text as is (default for text runs; no images)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--show-prompt", action="store_true", help="print each prompt before its answer")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load a checkpoint that has no checksum file")
    ap.add_argument("overrides", nargs="*", help="key=value changes to the run's config "
                    "(e.g. routing.capacity_factor=null)")
    a = ap.parse_args(list(args))
    if bool(a.prompt) == bool(a.eval):
        ap.error("give --prompt (one or more) or --eval N")
    with _user_errors("moe-vlm generate"):
        from moe_vlm.generate import generate, load_for_generation, uses_chat_template
        if a.eval:
            model, tokenizer, cfg = load_for_generation(a.run_dir, a.overrides, device=a.device,
                                                        trust=a.trust_checkpoint)
            _print_eval(model, tokenizer, cfg, a.eval)
            return

        if a.image is not None and len(a.image) != len(a.prompt):
            raise ValueError(f"{len(a.image)} --image for {len(a.prompt)} --prompt; give one "
                             "image per prompt")
        model, tokenizer, cfg = load_for_generation(a.run_dir, a.overrides, device=a.device,
                                                    trust=a.trust_checkpoint)
        chat = uses_chat_template(cfg) if a.chat is None else a.chat
        answers = generate(model, tokenizer, a.prompt, images=a.image,
                           max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, stop=a.stop, seed=a.seed,
                           chat=chat, v2pe_delta=cfg.data.v2pe_delta)
    for prompt, answer in zip(a.prompt, answers):
        if a.show_prompt:
            print(f"> {prompt}")
        print(answer.replace("\n", "\\n"))


def _print_eval(model, tokenizer, cfg, n: int) -> None:
    """``--eval N``: held-out questions answered by greedy generation, one line each
    (``ok``/``--``, sample:answer, the answer, the truth), then the accuracies."""
    from moe_vlm.generate.load import held_out_data
    from moe_vlm.train.evaluate_generated import generated_accuracy, generated_answers

    data = held_out_data(model, tokenizer, cfg)
    samples = [data.eval[i] for i in range(min(n, len(data.eval)))]
    answers = generated_answers(model, samples, tokenizer.eos_id, tokenizer.decode,
                                tokenizer.pad_id, v2pe_delta=cfg.data.v2pe_delta)
    if not answers:
        raise ValueError(f"data.name={cfg.data.name}: the first {len(samples)} held-out samples "
                         "have no question/answer pairs to score")
    for x in answers:
        print(f"{'ok' if x.correct else '--'} {x.sample}:{x.answer} "
              f"answer={x.generated_text!r} truth={x.truth_text!r}")
    for key, value in generated_accuracy(answers, data.answer_types or ()).items():
        print(f"{key}: {value:.4f}")
