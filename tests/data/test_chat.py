"""Chat template: loss exactly on answers (+ eos), image placeholders, answer ids, bad rows."""

from __future__ import annotations

import pytest

from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.chat import MalformedRow, render_conversation

TOK = ByteTokenizer()
K = 3  # image tokens per image
IMG = [TOK.image_id] * K


def conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def reference(exchanges: list[tuple[list[int], str]]) -> tuple[list[int], list[int], list[int]]:
    """Hand-built template: prompt token lists (images already expanded) and answers."""
    t, owner = [TOK.bos_id], [-1]
    for k, (prompt, answer) in enumerate(exchanges):
        a = TOK.encode(answer) + [TOK.eos_id]
        t += prompt + a + TOK.encode("\n")
        owner += [-1] * len(prompt) + [k] * len(a) + [-1]
    labels = [x if o >= 0 else -100 for x, o in zip(t[1:], owner[1:])]
    return t[:-1], labels, owner[1:]


def enc(s: str) -> list[int]:
    return TOK.encode(s)


def test_text_only_single_turn():
    ids, labels, answers = render_conversation(conv("hi", "yo"), TOK, 0, K)
    assert (ids, labels, answers) == reference([(enc("USER: hi\nASSISTANT: "), "yo")])
    assert len(ids) == len(labels) == len(answers)
    assert TOK.decode(ids) == "USER: hi\nASSISTANT: yo"
    # Loss exactly on "y", "o", eos, at the positions that predict them.
    assert [x for x in labels if x != -100] == enc("yo") + [TOK.eos_id]
    first = labels.index(ord("y"))
    assert ids[first] == ord(" ") and TOK.decode(ids[: first + 1]).endswith("ASSISTANT: ")
    # The input ends with the eos (the trailing separator is T[-1], never an input).
    assert ids[-2:] == [ord("o"), TOK.eos_id] and labels[-2:] == [TOK.eos_id, -100]
    assert answers == [0 if x != -100 else -1 for x in labels]


def test_one_image_with_and_without_marker():
    with_marker = render_conversation(conv("<image>\nWhat is this?", "A cat."), TOK, 1, K)
    prompt = enc("USER: ") + IMG + enc("\nWhat is this?\nASSISTANT: ")
    assert with_marker == reference([(prompt, "A cat.")])
    without = render_conversation(conv("What is this?", "A cat."), TOK, 1, K)
    assert without == with_marker  # LLaVA convention: "<image>\n" prepended
    ids, labels, _ = with_marker
    pos = [i for i, x in enumerate(ids) if x == TOK.image_id]
    assert pos == list(range(1 + len("USER: "), 1 + len("USER: ") + K))
    assert all(labels[i] == -100 for i in pos)
    assert TOK.image_id not in labels


def test_two_images_markers_and_prepended():
    ids, labels, answers = render_conversation(
        conv("left <image> right <image>?", "same"), TOK, 2, K)
    prompt = enc("USER: left ") + IMG + enc(" right ") + IMG + enc("?\nASSISTANT: ")
    assert (ids, labels, answers) == reference([(prompt, "same")])
    assert ids.count(TOK.image_id) == 2 * K
    ids2, _, _ = render_conversation(conv("compare", "same"), TOK, 2, K)
    assert ids2[: 1 + len("USER: ") + 2 * (K + 1)] == (
        [TOK.bos_id] + enc("USER: ") + IMG + enc("\n") + IMG + enc("\n"))


def test_multi_turn_answer_ids_and_marker_in_later_turn():
    turns = conv("hello", "hi there", "<image>\nand this?", "a dog", "sure?", "yes")
    ids, labels, answers = render_conversation(turns, TOK, 1, K)
    ref = reference([(enc("USER: hello\nASSISTANT: "), "hi there"),
                     (enc("USER: ") + IMG + enc("\nand this?\nASSISTANT: "), "a dog"),
                     (enc("USER: sure?\nASSISTANT: "), "yes")])
    assert (ids, labels, answers) == ref
    for k, text in enumerate(["hi there", "a dog", "yes"]):
        assert [x for x, a in zip(labels, answers) if a == k] == enc(text) + [TOK.eos_id]
    assert all((x == -100) == (a == -1) for x, a in zip(labels, answers))
    # Prompts of later turns carry no loss.
    assert TOK.decode([x for x in labels if x != -100]) == "hi therea dogyes"


def test_tokenizer_without_bos():
    class NoBos(ByteTokenizer):
        bos_id = None

    ids, labels, _ = render_conversation(conv("hi", "yo"), NoBos(), 0, K)
    assert ids[: len("USER: ")] == enc("USER: ")
    assert len(ids) == len(render_conversation(conv("hi", "yo"), TOK, 0, K)[0]) - 1


@pytest.mark.parametrize("turns, n_images, reason", [
    ([], 0, "empty"),
    ("not a list", 0, "must be a list"),
    (None, 0, "must be a list"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], 0, "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], 0, "alternate"),
    ([{"from": "human", "value": "a"}], 0, "no gpt answer"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], 0, "alternate"),
    ([{"from": "human", "value": 5}, {"from": "gpt", "value": "b"}], 0, "must be a string"),
    ([{"from": "human"}, {"from": "gpt", "value": "b"}], 0, "must be a string"),
    (["human: hi", "gpt: yo"], 0, "not an object"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "b"}], 1,
     "2 <image> markers but 1 images"),
    ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "b"}], 0,
     "1 <image> markers but 0 images"),
    ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "b"}], 2,
     "1 <image> markers but 2 images"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], 1, "gpt"),
])
def test_malformed(turns, n_images, reason):
    with pytest.raises(MalformedRow, match=reason):
        render_conversation(turns, TOK, n_images, K)


def test_malformed_is_value_error_and_image_tokens_validated():
    assert issubclass(MalformedRow, ValueError)
    with pytest.raises(ValueError, match="n_image_tokens"):
        render_conversation(conv("hi", "yo"), TOK, 0, 0)
