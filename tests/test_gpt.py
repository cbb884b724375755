"""model/gpt.py: attention is causal and windowed where the config says, and `logits_mask` computes exactly the
logits it keeps (the logits of every family against transformers are in test_convert.py)."""

import torch
from hf_models import VOCAB

from model import GPT, Config


def tiny_gpt(**overrides) -> GPT:
    config = Config(**{"name": "t", "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 32,
                       "intermediate_size": 64, "block_size": 64, **overrides})
    torch.manual_seed(0)
    return GPT(config).eval()


def test_sliding_window_really_limits_attention():
    """Changing a token outside the window must not change the last position's logits (and must inside it)."""
    config = Config(name="sw", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, sliding_window=4,
                    hf_architecture="MistralForCausalLM", block_size=64)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    far, near = idx.clone(), idx.clone()
    far[0, 7] = (far[0, 7] + 1) % VOCAB  # 4 positions before the last: outside a window of 4
    near[0, 8] = (near[0, 8] + 1) % VOCAB
    with torch.no_grad():
        base, out_far, out_near = model(idx)[0, -1], model(far)[0, -1], model(near)[0, -1]
    assert torch.equal(base, out_far)
    assert not torch.allclose(base, out_near)


def test_a_token_never_sees_the_tokens_after_it():
    model = tiny_gpt()
    idx = torch.randint(0, VOCAB, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_logits_mask_keeps_exactly_the_masked_positions():
    model = tiny_gpt()
    idx = torch.randint(0, VOCAB, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [2, 8]] = True
    mask[1, 4] = True
    with torch.no_grad():
        full, masked = model(idx), model(idx, logits_mask=mask)
    assert masked.shape == (3, VOCAB)
    assert torch.allclose(masked, full[mask], atol=1e-5)
