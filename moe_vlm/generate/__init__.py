"""Ask a trained model: KV-cached autoregressive generation (greedy, temperature, top-k,
top-p, stop strings, batched prompts, image prompts) and loading a run for it.

    from moe_vlm.generate import generate, load_for_generation
    model, tok, cfg = load_for_generation("runs/my_run")
    generate(model, tok, ["how many shapes are there?"], images=["scene.png"])

``python -m moe_vlm.generate`` = ``moe-vlm generate``.
"""

from moe_vlm.generate.decode import generate, generate_ids
from moe_vlm.generate.load import load_for_generation, uses_chat_template
from moe_vlm.generate.sampling import Sampling, filtered_logits, next_tokens

__all__ = ["generate", "generate_ids", "load_for_generation", "uses_chat_template", "Sampling", "filtered_logits",
           "next_tokens"]
