"""Packing: several samples in one row give each sample exactly the logits and the loss it gets alone."""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, Config
from model.data.sft import IGNORE_INDEX, get_collate_fn, get_packed_collate_fn, pack_samples
import model.gpt
from model.gpt import packed_positions, segment_spans

VOCAB = 97
FAMILIES = {
    "llama_gqa": dict(n_query_groups=2),
    "mistral_window": dict(n_query_groups=2, sliding_window=3),
    "phi_partial_rope": dict(n_query_groups=4, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
                             rotary_percentage=0.5, parallel_residual=True, shared_attention_norm=True),
    "mixtral_moe": dict(n_query_groups=2, mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2),
}


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = Config(name="tiny", vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, intermediate_size=48,
                    block_size=64, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():  # random norms and biases so that nothing is trivially zero or one
        for name, parameter in model.named_parameters():
            if name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight")) or name.endswith("bias"):
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


def make_samples(lengths: list[int], prompt_lengths: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length, prompt_length in zip(lengths, prompt_lengths):
        ids = torch.randint(0, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt_length] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels, "prompt": "", "response": ""})
    return samples


def per_sample_losses(model, batch: dict) -> list[torch.Tensor]:
    """The summed next-token loss of each sample, found through segment ids (or rows, unpacked)."""
    logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                   ignore_index=IGNORE_INDEX, reduction="none")
    if "segment_ids" not in batch:
        return list(token_losses.sum(dim=1))
    segments = batch["segment_ids"][:, 1:]  # the segment of the label each loss term predicts
    return [token_losses[row][segments[row] == n].sum()
            for row in range(segments.size(0)) for n in range(int(segments[row].max()) + 1)]


def test_positions_restart_and_each_sample_is_one_span():
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 1]])
    assert packed_positions(segment_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]
    assert segment_spans(segment_ids) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 7), (7, 8)]]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_row_length_mask_reaches_attention(family, monkeypatch):
    """Packed rows attend sample by sample: every attention call covers one sample, and a mask appears only where a
    sample outgrows the sliding window, shaped by that sample's length as it would be alone."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape, None if attn_mask is None else attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(model.gpt.F, "scaled_dot_product_attention", recording_sdpa)
    gpt = tiny_gpt(**FAMILIES[family])
    samples = make_samples([7, 5, 9, 3], [2, 1, 4, 0])
    packed = get_packed_collate_fn()([samples[:3], samples[3:]])
    T = packed["input_ids"].size(1)
    gpt(packed["input_ids"], segment_ids=packed["segment_ids"])
    lengths = {len(sample["input_ids"]) for sample in samples} | {T - 3}  # the second row's padding is a span too
    assert calls and all(q_shape[0] == 1 and q_shape[2] in lengths for q_shape, _ in calls)
    window = FAMILIES[family].get("sliding_window")
    for q_shape, mask_shape in calls:
        if window is None or q_shape[2] <= window:
            assert mask_shape is None
        else:
            assert mask_shape == (q_shape[2], q_shape[2]) and q_shape[2] < T


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_equal_each_sample_alone(family):
    model = tiny_gpt(**FAMILIES[family])
    samples = make_samples([7, 5, 9, 3], [2, 1, 4, 0])
    packed = get_packed_collate_fn()([samples[:3], samples[3:]])
    logits = model(packed["input_ids"], segment_ids=packed["segment_ids"])
    offsets = {0: 0, 1: 7, 2: 12}
    for index, sample in enumerate(samples):
        alone = model(sample["input_ids"].unsqueeze(0))[0]
        row, offset = (0, offsets[index]) if index < 3 else (1, 0)
        torch.testing.assert_close(logits[row, offset:offset + len(sample["input_ids"])], alone, atol=1e-5, rtol=1e-5)


def test_a_packed_batch_gives_the_same_per_sample_loss_and_gradient_as_unpacked():
    model = tiny_gpt(n_query_groups=2)
    samples = make_samples([12, 4, 9, 6, 3, 10], [5, 1, 3, 0, 2, 4])
    packs = pack_samples([len(s["input_ids"]) for s in samples], max_seq_length=16)
    order = [i for pack in packs for i in pack]
    packed_losses = per_sample_losses(model, get_packed_collate_fn()([[samples[i] for i in p] for p in packs]))
    unpacked_losses = per_sample_losses(model, get_collate_fn()([samples[i] for i in order]))
    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(unpacked_losses), atol=1e-5, rtol=1e-5)

    gradients = []
    for losses in (packed_losses, unpacked_losses):
        model.zero_grad()
        torch.stack(losses).sum().backward(retain_graph=True)
        gradients.append(model.transformer.h[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-5, rtol=1e-4)


def test_the_first_label_of_every_packed_sample_is_ignored():
    samples = make_samples([4, 3], [0, 0])
    batch = get_packed_collate_fn()([samples])
    assert batch["labels"][0].tolist()[0] == IGNORE_INDEX and batch["labels"][0].tolist()[4] == IGNORE_INDEX
    assert batch["labels"][0].tolist()[1:4] == samples[0]["labels"][1:].tolist()
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]


def test_pack_samples_uses_every_sample_once_and_fills_packs_tightly():
    lengths = [30, 3, 17, 8, 12, 5, 50, 1, 16, 9]
    packs = pack_samples(lengths, max_seq_length=32)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], 32) for i in pack) <= 32 for pack in packs)
    assert [6] in packs  # longer than a pack: alone, cut later by the collate function
    assert len(packs) == 5  # 133 tokens (the 50 counted as 32) need at least ceil(133 / 32) = 5 rows
    assert pack_samples(lengths, max_seq_length=32) == packs


def test_generation_with_a_kv_cache_refuses_segment_ids():
    model = tiny_gpt()
    model.set_kv_cache(batch_size=1)
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.tensor([[1, 2]]), input_pos=torch.arange(2), segment_ids=torch.tensor([[0, 0]]))
