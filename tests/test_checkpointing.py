"""Gradient checkpointing (`block`, and `offload` with the block input in CPU memory) gives the loss and the gradients
of `none`, exactly in float32: full fine-tuning, LoRA with dropout, DoRA, QLoRA, packed samples. (`selective`:
tests/test_activations.py.)"""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, Config
from model.data.sft import IGNORE_INDEX
from model.gpt import CHECKPOINTING_MODES
from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
from model.quantize import quantize_model

VOCAB = 97
SETUPS = ("full", "lora", "lora_dropout", "dora", "qlora", "packed", "mixtral")


def build(setup: str, **overrides) -> GPT:
    torch.manual_seed(0)
    extra = dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2) if setup == "mixtral" else overrides
    config = Config(name="tiny", vocab_size=VOCAB, n_layer=3, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=96, block_size=64, **extra)
    model = GPT(config)
    if setup == "qlora":
        quantize_model(model, "bnb.nf4", torch.float32)
    if setup != "full":
        lora = LoRAConfig(r=4, alpha=8, dropout=0.1 if setup == "lora_dropout" else 0.0, key=True, projection=True,
                          mlp=True, dora=setup == "dora")
        inject_lora(model, lora)
        mark_only_lora_as_trainable(model)
        with torch.no_grad():  # B = 0 at init would give A no gradient
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.normal_(0, 0.1)
    return model.train()


def loss_and_grads(setup: str, mode: str, **overrides):
    model = build(setup, **overrides).set_gradient_checkpointing(mode)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 24), generator=generator)
    targets[:, :3] = IGNORE_INDEX
    segment_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 7 + [2] * 12]) if setup == "packed" else None
    torch.manual_seed(2)  # the dropout masks
    logits = model(ids, segment_ids=segment_ids)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    assert grads and all(grad.abs().sum() > 0 for grad in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("setup", SETUPS)
def test_checkpointing_gives_the_loss_and_gradients_of_none(setup):
    loss, grads = loss_and_grads(setup, "none")
    for mode in ("block", "offload"):
        checkpointed_loss, checkpointed_grads = loss_and_grads(setup, mode)
        torch.testing.assert_close(checkpointed_loss, loss, atol=0, rtol=0)
        assert checkpointed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)



def saved_bytes(mode: str) -> int:
    """Bytes of the distinct device tensors autograd keeps for the backward pass of one forward pass."""
    model = build("lora").set_gradient_checkpointing(mode)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(torch.randint(0, VOCAB, (2, 24))).sum()
    loss.backward()
    return sum(saved.values())


def test_block_keeps_each_blocks_input_and_offload_not_even_that():
    none, selective, block, offload = (saved_bytes(mode) for mode in CHECKPOINTING_MODES)
    hidden_bytes = 2 * 24 * 64 * 4  # one block's input (B, T, n_embd) in float32
    # each of the 3 blocks keeps its input under `block`; `offload` moves those to the CPU (outside autograd)
    assert block - offload == 3 * hidden_bytes
    assert none > selective > 5 * block


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="block, offload"):
        build("full").set_gradient_checkpointing("all")


def test_no_checkpointing_without_gradients():
    model = build("lora").set_gradient_checkpointing("offload").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits, build("lora").eval()(ids).detach())
