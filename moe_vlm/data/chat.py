"""Chat template: a LLaVA conversation -> ``(input_ids, labels, answer_ids)``.

The token stream ``T`` of a conversation with exchanges ``(human_k, gpt_k)`` is::

    <bos>                                       (only if the tokenizer has one)
    for k = 0, 1, ...:
        "USER: " + human_k + "\\nASSISTANT: "    prompt: no loss
        gpt_k + <eos>                           answer k: loss on every token and the eos
        "\\n"                                    separator: no loss

Each ``<image>`` marker in a human turn becomes ``n_image_tokens`` copies of
``tokenizer.image_id`` (the model splices the image's features there, images in order).
If the row has images but no marker, one ``"<image>\\n"`` per image is prepended to the
first human turn (the LLaVA convention). Text is encoded piece by piece (prompt pieces
between markers, each answer), so no subword merges across a prompt/answer boundary:
the prompt a model sees at generation time tokenizes exactly as in training.

The sample is next-token shaped, matching ``sample.py``: ``input_ids = T[:-1]`` and
``labels[i] = T[i + 1]`` where ``T[i + 1]`` is an answer token (or its eos), else
-100; so the loss is taken exactly at the positions that *predict* the answers, never
on prompts, image placeholders or separators. ``answer_ids[i] = k`` (the 0-based index
of the exchange, i.e. of the question) at the label positions of answer ``k``, else
-1; eval uses it for per-question exact match. The final separator is dropped (it is
``T[-1]``), so a sample ends with the last answer's eos.

Roles are ``human``/``gpt`` (``user``/``assistant`` are accepted as aliases), strictly
alternating, starting with ``human`` and ending with ``gpt``. Anything else raises
``MalformedRow`` with the reason, so a dataset can skip and count the row.
"""

from __future__ import annotations

from typing import Any, Sequence

from moe_vlm.data.sample import IGNORE_INDEX

IMAGE_MARKER = "<image>"
USER_PREFIX, ASSISTANT_PREFIX, SEPARATOR = "USER: ", "\nASSISTANT: ", "\n"
HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")


class MalformedRow(ValueError):
    """A conversation that the template cannot render; the message says why."""


def _exchanges(turns: Any) -> list[tuple[str, str]]:
    """Validate the turns and pair them into ``(human, gpt)`` exchanges."""
    if not isinstance(turns, (list, tuple)):
        raise MalformedRow(f"conversations must be a list of turns, got {type(turns).__name__}")
    if len(turns) == 0:
        raise MalformedRow("empty conversations")
    pairs: list[tuple[str, str]] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise MalformedRow(f"turn {j} is not an object: {turn!r:.60}")
        role, value = turn.get("from"), turn.get("value")
        want = HUMAN_ROLES if j % 2 == 0 else GPT_ROLES
        if role not in want:
            raise MalformedRow(f"turn {j} has role {role!r}, expected {want[0]!r} "
                               "(roles must alternate human/gpt, starting with human)")
        if not isinstance(value, str):
            raise MalformedRow(f"turn {j} value must be a string, got {type(value).__name__}")
        if j % 2 == 1:
            if IMAGE_MARKER in value:
                raise MalformedRow(f"turn {j} (gpt) contains an {IMAGE_MARKER} marker")
            pairs.append((turns[j - 1]["value"], value))
    if len(turns) % 2 == 1:
        raise MalformedRow(f"the last human turn ({len(turns) - 1}) has no gpt answer")
    return pairs


def _prompt_tokens(human: str, tokenizer: Any, n_image_tokens: int) -> list[int]:
    """``"USER: " + human + "\\nASSISTANT: "``, each ``<image>`` marker as
    ``n_image_tokens`` placeholder ids, the text encoded piece by piece."""
    tokens: list[int] = []
    for j, piece in enumerate((USER_PREFIX + human + ASSISTANT_PREFIX).split(IMAGE_MARKER)):
        if j > 0:
            tokens += [tokenizer.image_id] * n_image_tokens
        tokens += tokenizer.encode(piece) if piece else []
    return tokens


def render_prompt(question: str, tokenizer: Any, n_images: int, n_image_tokens: int) -> list[int]:
    """The token ids a model trained on ``render_conversation`` sees before its answer to a
    one-turn ``question``: ``<bos>`` (if any), ``"USER: " + question + "\\nASSISTANT: "``,
    with the same image placeholder layout (one ``"<image>\\n"`` per image prepended when
    the question has no marker). For generation."""
    n_markers = question.count(IMAGE_MARKER)
    if n_markers == 0 and n_images > 0:
        question = (IMAGE_MARKER + "\n") * n_images + question
        n_markers = n_images
    if n_markers != n_images:
        raise ValueError(f"the prompt has {n_markers} {IMAGE_MARKER} markers but {n_images} "
                         "images are given; give one image per marker")
    if n_images and n_image_tokens < 1:
        raise ValueError(f"n_image_tokens must be >= 1, got {n_image_tokens}")
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + _prompt_tokens(question, tokenizer, n_image_tokens)


def render_conversation(turns: Sequence[dict], tokenizer: Any, n_images: int,
                        n_image_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """Render one conversation; returns ``(input_ids, labels, answer_ids)``, each of
    length ``len(T) - 1`` (see the module docstring for the template)."""
    if n_image_tokens < 1:
        raise ValueError(f"n_image_tokens must be >= 1, got {n_image_tokens}")
    pairs = _exchanges(turns)
    n_markers = sum(h.count(IMAGE_MARKER) for h, _ in pairs)
    if n_markers == 0 and n_images > 0:
        pairs[0] = ((IMAGE_MARKER + "\n") * n_images + pairs[0][0], pairs[0][1])
        n_markers = n_images
    if n_markers != n_images:
        raise MalformedRow(f"{n_markers} {IMAGE_MARKER} markers but {n_images} images")

    bos = getattr(tokenizer, "bos_id", None)
    tokens: list[int] = [bos] if bos is not None else []  # T
    owner: list[int] = [-1] * len(tokens)  # per token of T: answer index if a target, else -1
    for k, (human, gpt) in enumerate(pairs):
        tokens += _prompt_tokens(human, tokenizer, n_image_tokens)
        owner += [-1] * (len(tokens) - len(owner))
        answer = tokenizer.encode(gpt) + [tokenizer.eos_id]
        tokens += answer
        owner += [k] * len(answer)
        sep = tokenizer.encode(SEPARATOR)
        tokens += sep
        owner += [-1] * len(sep)

    input_ids = tokens[:-1]
    labels = [t if o >= 0 else IGNORE_INDEX for t, o in zip(tokens[1:], owner[1:])]
    answer_ids = owner[1:]
    return input_ids, labels, answer_ids


__all__ = ["MalformedRow", "render_conversation", "render_prompt", "IMAGE_MARKER"]
