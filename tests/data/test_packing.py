"""Greedy packing: token and image budgets, order, padding, answer-id offsets, drops."""

from __future__ import annotations

import torch

from moe_vlm.data.packing import Packer, pack_samples
from moe_vlm.data.sample import collate

PAD = 999


def sample(tag: int, n_tokens: int, n_images: int, n_answers: int = 1) -> dict:
    """Tokens all equal ``tag`` (to trace order); the last n_answers*2 positions labelled."""
    ids = torch.full((n_tokens,), tag, dtype=torch.long)  # [S]
    labels = torch.full((n_tokens,), -100, dtype=torch.long)  # [S]
    answers = torch.full((n_tokens,), -1, dtype=torch.long)  # [S]
    for k in range(n_answers):
        pos = n_tokens - 2 * (n_answers - k)
        labels[pos:pos + 2] = tag
        answers[pos:pos + 2] = k
    pixels = torch.full((n_images, 3, 2, 2), float(tag))  # [N, 3, H, W]
    return {"input_ids": ids, "labels": labels, "answer_ids": answers, "pixel_values": pixels}


def test_budgets_order_and_padding():
    # 5+4 tokens | +6 > 10 tokens: new pack 6+2 | 8+2 <= 10 tokens but 3 > 2 images: new pack
    stream = [sample(1, 5, 1), sample(2, 4, 0), sample(3, 6, 1), sample(4, 2, 1),
              sample(5, 2, 1), sample(6, 3, 0)]
    packer = Packer(seq_len=10, max_images=2, pad_id=PAD)
    packs = list(packer.pack(stream))
    order = [[t for t in p["input_ids"].unique_consecutive().tolist() if t != PAD] for p in packs]
    assert order == [[1, 2], [3, 4], [5, 6]]
    for p in packs:
        assert p["input_ids"].shape == p["labels"].shape == p["answer_ids"].shape == (10,)
        assert p["pixel_values"].shape[0] <= 2
        n = int((p["input_ids"] != PAD).sum())
        assert (p["input_ids"][n:] == PAD).all() and (p["labels"][n:] == -100).all()
        assert (p["answer_ids"][n:] == -1).all()
    assert packs[0]["input_ids"].tolist() == [1] * 5 + [2] * 4 + [PAD]
    assert packs[1]["input_ids"].tolist() == [3] * 6 + [4] * 2 + [PAD] * 2
    assert packs[1]["pixel_values"][:, 0, 0, 0].tolist() == [3.0, 4.0]  # images in sample order
    assert packs[2]["pixel_values"][:, 0, 0, 0].tolist() == [5.0]
    assert packer.stats == {"packs": 3, "samples": 6, "dropped_too_long": 0,
                            "dropped_too_many_images": 0}
    batch = collate(packs, pad_id=PAD)  # packs batch with the shared collate
    assert batch["input_ids"].shape == (3, 10) and batch["pixel_values"].shape[0] == 4
    # The packed tails are padding: False in the token mask, which collate keeps.
    assert batch["token_mask"].tolist() == [[True] * 9 + [False], [True] * 8 + [False] * 2,
                                            [True] * 5 + [False] * 5]


def test_collate_token_mask_even_when_pad_id_is_a_real_token():
    """The mask comes from sample lengths, not from pad ids (a Hugging Face tokenizer may
    pad with EOS, which real text contains)."""
    eos = 7
    a = {"input_ids": torch.tensor([1, 2, eos]), "labels": torch.tensor([2, eos, -100])}
    b = {"input_ids": torch.tensor([3, eos]), "labels": torch.tensor([eos, -100])}
    c = {"input_ids": torch.tensor([4, 5, 6, eos, 8]), "labels": torch.full((5,), -100),
         "token_mask": torch.tensor([True, True, True, True, False])}  # its own padded tail
    batch = collate([a, b, c], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, eos, eos, eos], [3, eos, eos, eos, eos],
                                           [4, 5, 6, eos, 8]]
    assert batch["token_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3,
                                            [True] * 4 + [False]]


def test_labels_and_answer_ids_offset_within_pack():
    packs = list(pack_samples([sample(1, 6, 0, n_answers=2), sample(2, 4, 0, n_answers=0),
                               sample(3, 5, 0, n_answers=1)], seq_len=16, max_images=4, pad_id=PAD))
    assert len(packs) == 1
    p = packs[0]
    assert p["labels"].tolist() == ([-100, -100, 1, 1, 1, 1] + [-100] * 4
                                    + [-100, -100, -100, 3, 3] + [-100])
    assert p["answer_ids"].tolist() == ([-1, -1, 0, 0, 1, 1] + [-1] * 4
                                        + [-1, -1, -1, 2, 2] + [-1])


def test_oversize_samples_dropped_and_counted():
    stream = [sample(1, 3, 0), sample(2, 11, 0), sample(3, 3, 3), sample(4, 10, 2)]
    packer = Packer(seq_len=10, max_images=2, pad_id=PAD)
    packs = list(packer.pack(stream))
    assert [p["input_ids"][0].item() for p in packs] == [1, 4]
    assert packer.stats == {"packs": 2, "samples": 2, "dropped_too_long": 1,
                            "dropped_too_many_images": 1}
    assert packs[1]["input_ids"].tolist() == [4] * 10  # exactly full: no padding


def test_text_only_samples_and_lazy_iteration():
    text = [{"input_ids": torch.arange(4), "labels": torch.arange(1, 5)} for _ in range(5)]
    it = pack_samples(iter(text), seq_len=8, max_images=0, pad_id=PAD)
    first = next(it)  # lazy: works on an unbounded stream
    assert "pixel_values" not in first and first["answer_ids"].tolist() == [-1] * 8
    assert first["labels"].tolist() == [1, 2, 3, 4] * 2
    rest = list(it)
    assert len(rest) == 2 and rest[-1]["input_ids"].tolist() == [0, 1, 2, 3] + [PAD] * 4
    assert list(pack_samples([], 8, 0, PAD)) == []
