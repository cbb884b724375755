"""Gradient checkpointing (`block`, and `offload` with the block input in CPU memory) gives the loss and the gradients
of `none`, exactly in float32: full fine-tuning, LoRA and DoRA with dropout, QLoRA, packed samples; so does
checkpointing only the first Blocks (`checkpoint_layers`). (`selective`: tests/test_activations.py.)"""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, Config
from model.data.sft import IGNORE_INDEX
from model.gpt import CHECKPOINTING_MODES
from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
from model.quantize import quantize_model

VOCAB = 97
SETUPS = ("full", "lora", "lora_dropout", "dora", "dora_dropout", "qlora", "packed", "mixtral")


def build(setup: str, **overrides) -> GPT:
    torch.manual_seed(0)
    extra = dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2) if setup == "mixtral" else overrides
    config = Config(name="tiny", vocab_size=VOCAB, n_layer=3, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=96, block_size=64, **extra)
    model = GPT(config)
    if setup == "qlora":
        quantize_model(model, "bnb.nf4", torch.float32)
    if setup != "full":
        lora = LoRAConfig(r=4, alpha=8, dropout=0.1 if setup.endswith("_dropout") else 0.0, key=True, projection=True,
                          mlp=True, dora=setup.startswith("dora"))
        inject_lora(model, lora)
        mark_only_lora_as_trainable(model)
        with torch.no_grad():  # B = 0 at init would give A no gradient
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.normal_(0, 0.1)
    return model.train()


def loss_and_grads(setup: str, mode: str, layers=None, rest="none", **overrides):
    model = build(setup, **overrides).set_gradient_checkpointing(mode, layers, rest)
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



@pytest.mark.parametrize("setup", ("lora_dropout", "qlora", "packed"))
@pytest.mark.parametrize("mode, rest", [("selective", "none"), ("block", "none"), ("offload", "none"),
                                        ("block", "selective"), ("offload", "selective")])
def test_checkpointing_the_first_blocks_gives_the_loss_and_gradients_of_none(setup, mode, rest):
    loss, grads = loss_and_grads(setup, "none")
    for layers in (1, 2):
        checkpointed_loss, checkpointed_grads = loss_and_grads(setup, mode, layers, rest)
        torch.testing.assert_close(checkpointed_loss, loss, atol=0, rtol=0)
        assert checkpointed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def saved_bytes(mode: str, layers=None, rest="none") -> int:
    """Bytes of the distinct device tensors autograd keeps for the backward pass of one forward pass."""
    model = build("lora").set_gradient_checkpointing(mode, layers, rest)
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


@pytest.mark.parametrize("mode", ("selective", "block", "offload"))
def test_checkpointing_the_first_blocks_keeps_in_proportion(mode):
    """`checkpoint_layers=k` keeps what `mode` keeps in the first k Blocks and what `none` keeps in the others: every
    further checkpointed Block saves the same bytes (Blocks 1 and 2 are alike; Block 0's input is the frozen
    embedding's output, which `none` does not keep), and all 3 is `mode` itself."""
    kept = [saved_bytes("none")] + [saved_bytes(mode, layers) for layers in (1, 2, 3)]
    assert kept[3] == saved_bytes(mode)
    assert kept[0] > kept[1] > kept[2] > kept[3]
    assert kept[1] - kept[2] == kept[2] - kept[3]


def test_the_other_blocks_selective_keep_what_selective_keeps_there():
    """`checkpoint_rest="selective"`: Blocks 1 and 2 drop under `block` on Block 0 what they drop under `selective`."""
    selective_saves_in_blocks_1_2 = saved_bytes("selective", 1) - saved_bytes("selective")
    assert selective_saves_in_blocks_1_2 > 0
    assert saved_bytes("block", 1, "selective") == saved_bytes("block", 1) - selective_saves_in_blocks_1_2
    assert saved_bytes("offload", 3, "selective") == saved_bytes("offload")


def test_checkpoint_layers_out_of_range_or_without_a_mode_is_refused():
    with pytest.raises(ValueError, match="between 1 and the model's 3 layers, got 4"):
        build("full").set_gradient_checkpointing("block", 4)
    with pytest.raises(ValueError, match="between 1 and the model's 3 layers, got 0"):
        build("full").set_gradient_checkpointing("block", 0)
    with pytest.raises(ValueError, match="other than none"):
        build("full").set_gradient_checkpointing("none", 2)
    with pytest.raises(ValueError, match="needs checkpoint_layers with gradient checkpointing block or offload"):
        build("full").set_gradient_checkpointing("block", None, "selective")
    with pytest.raises(ValueError, match="needs checkpoint_layers"):
        build("full").set_gradient_checkpointing("selective", 2, "selective")
    with pytest.raises(ValueError, match="none or selective, got 'block'"):
        build("full").set_gradient_checkpointing("offload", 2, "block")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="block, offload"):
        build("full").set_gradient_checkpointing("all")


def test_no_checkpointing_without_gradients():
    model = build("lora").set_gradient_checkpointing("offload").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits, build("lora").eval()(ids).detach())
