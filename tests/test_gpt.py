"""model/gpt.py: attention is causal and windowed where the config says, `logits_mask` computes exactly the
logits it keeps (the logits of every family against transformers are in test_convert.py), and compiled Blocks
train as the eager ones without compiling again for every sequence length."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_models import VOCAB

from model import GPT, Config
from model.data.sft import IGNORE_INDEX
from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable


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


def lora_loss_and_grads(model: GPT, length: int, segment_ids=None):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, VOCAB, (2, length), generator=generator)
    targets = torch.randint(0, VOCAB, (2, length), generator=generator)
    targets[:, :3] = IGNORE_INDEX
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(ids, segment_ids=segment_ids).flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def kept_bytes(model: GPT, length: int) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of `model`'s loss, the weights excluded."""
    from tests.test_activations import saved_storages

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    _, saved = saved_storages(lambda: lora_loss_and_grads(model, length))
    return sum(size for ptr, size in saved.items() if ptr not in weights)


def lora_gpt(lora_config: LoRAConfig, quantize: bool = False) -> GPT:
    """A tiny GPT with LoRA in training mode (nf4 base with `quantize`), B drawn at random: B = 0 at init would give A
    no gradient."""
    model = tiny_gpt(n_embd=64)
    if quantize:
        from model.quantize import quantize_model

        quantize_model(model, "bnb.nf4", torch.float32)
    inject_lora(model, lora_config)
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.1)
    return model.train()


def assert_same_loss_and_grads(compiled: GPT, eager: GPT, length: int) -> None:
    loss, grads = lora_loss_and_grads(eager, length)
    compiled_loss, compiled_grads = lora_loss_and_grads(compiled, length)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-6, rtol=1e-5)
    assert compiled_grads.keys() == grads.keys() and all(grad.abs().sum() > 0 for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_compiled_blocks_give_the_loss_and_lora_gradients_of_eager_at_every_length(one_thread):
    """fp32 LoRA through inductor: the loss and every LoRA gradient equal eager's to float32 rounding, without and
    with gradient checkpointing (the checkpoint recomputes through the compiled Block), at three sequence lengths
    that reuse the graphs of the first (dynamic shapes), and with only the first Block checkpointed (no new graphs);
    evaluation stays eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs of other tests' models would count against the recompile limit
    counters.clear()
    eager = lora_gpt(LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, mlp=True))
    compiled = copy.deepcopy(eager).compile_blocks()
    for checkpointing in ("none", "selective", "block", "offload"):
        eager.set_gradient_checkpointing(checkpointing)
        compiled.set_gradient_checkpointing(checkpointing)
        graphs = None
        for length in (24, 17, 40):
            assert_same_loss_and_grads(compiled, eager, length)
            graphs = graphs or dict(counters["stats"])
            assert dict(counters["stats"]) == graphs, f"compiled again for length {length} ({checkpointing})"
    # only the first Block checkpointed, the other plain or selective: each Block takes its compiled version
    for checkpointing, rest in (("selective", "none"), ("offload", "selective")):
        eager.set_gradient_checkpointing(checkpointing, 1, rest)
        compiled.set_gradient_checkpointing(checkpointing, 1, rest)
        assert_same_loss_and_grads(compiled, eager, 24)
    # `selective` under inductor keeps what eager `selective` keeps (give or take what the partitioner chooses among
    # the ops `model.gpt.CHEAP_OPS` lets it compute again), well under `none`
    compiled_kept = {mode: kept_bytes(compiled.set_gradient_checkpointing(mode), 24) for mode in ("none", "selective")}
    eager_selective = kept_bytes(eager.set_gradient_checkpointing("selective"), 24)
    assert compiled_kept["selective"] < 0.85 * compiled_kept["none"]
    # (a Block that fell back to eager would hide what its checkpoint keeps: far less)
    assert 0.95 * eager_selective < compiled_kept["selective"] < 1.05 * eager_selective
    # one graph for the first Block (its input needs no gradient: the embedding is frozen), one for the others;
    # selective's Blocks (another function) two more; offload also runs them without gradients in the forward pass:
    # two more
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    with torch.no_grad():  # no gradients: the eager Blocks, no compilation
        compiled(torch.randint(0, VOCAB, (1, 9)))
    # packed rows: the eager Blocks too (a compiled one would compile again for every layout of samples)
    for segment_ids in (torch.tensor([[0] * 10 + [1] * 14] * 2), torch.tensor([[0] * 3 + [1] * 9 + [2] * 12] * 2)):
        assert lora_loss_and_grads(compiled, 24, segment_ids)[0] == lora_loss_and_grads(eager, 24, segment_ids)[0]
    assert dict(counters["stats"]) == graphs


def test_compiled_selective_blocks_with_lora_dropout_compile_whole(one_thread):
    """LoRA dropout on the CPU draws its mask in place, which Dynamo cannot trace inside `selective`'s checkpoint:
    compiled, it is `F.dropout`, so the Blocks compile without a graph break (a break would run the whole Block
    eagerly) and train."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = lora_gpt(LoRAConfig(r=4, alpha=8, dropout=0.1, mlp=True)).compile_blocks()
    loss, grads = lora_loss_and_grads(model.set_gradient_checkpointing("selective"), 24)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.isfinite(loss) and all(grad.abs().sum() > 0 for grad in grads.values())


def test_compiled_qlora_blocks_give_the_loss_and_lora_gradients_of_eager(one_thread):
    """QLoRA through inductor (bitsandbytes' 4-bit matmul inside the compiled Blocks, fp32 compute): the loss and
    every LoRA gradient equal eager's, without checkpointing, with `selective` and with `offload` (the setting that
    fits an 8B QLoRA run in 8 GB)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = lora_gpt(LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, value=True, projection=True, mlp=True),
                     quantize=True)
    compiled = copy.deepcopy(eager).compile_blocks()
    for checkpointing in ("none", "selective", "offload"):
        eager.set_gradient_checkpointing(checkpointing)
        compiled.set_gradient_checkpointing(checkpointing)
        assert_same_loss_and_grads(compiled, eager, 24)
    assert counters["stats"]["unique_graphs"] >= 2, "the compiled Blocks did not compile"
