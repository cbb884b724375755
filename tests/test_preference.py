"""model/preference.py: every loss equals its formula and TRL's, sequence log-probs count answer tokens only and do
not depend on padding, LoRA's adapters-off reference is the base model, the reference cache is keyed right.
"""

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from model.config import Config
from model.data.preference import collate_pairs, pair_tokens
from model.data.sft import IGNORE_INDEX
from model.gpt import GPT
from model.lora import LoRAConfig, inject_lora, lora_disabled
from model.training.preference import (
    hinge_loss,
    ipo_loss,
    orpo_odds_ratio_loss,
    preference_losses,
    reference_cache_path,
    robust_loss,
    sequence_logps,
    sigmoid_loss,
)

# hand-made summed log-probs of 4 pairs, and the answers' token counts
POLICY_CHOSEN = torch.tensor([-5.0, -12.5, -3.25, -20.0])
POLICY_REJECTED = torch.tensor([-6.5, -11.0, -9.0, -19.5])
REF_CHOSEN = torch.tensor([-5.5, -12.0, -4.0, -21.0])
REF_REJECTED = torch.tensor([-6.0, -11.5, -8.0, -19.0])
CHOSEN_TOKENS = torch.tensor([3, 5, 2, 8])
REJECTED_TOKENS = torch.tensor([4, 5, 6, 7])


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def by_hand(loss: str, beta: float, eps: float) -> list[float]:
    """Each paper's formula, one pair at a time, in Python floats."""
    values = []
    for i in range(4):
        pc, pr, rc, rr = (float(t[i]) for t in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED))
        nc, nr = int(CHOSEN_TOKENS[i]), int(REJECTED_TOKENS[i])
        h = (pc - rc) - (pr - rr)
        if loss == "sigmoid":
            values.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
        elif loss == "ipo":
            h_avg = (pc / nc - rc / nc) - (pr / nr - rr / nr)
            values.append((h_avg - 1 / (2 * beta)) ** 2)
        elif loss == "hinge":
            values.append(max(0.0, 1 - beta * h))
        elif loss == "robust":
            values.append(((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps))
        elif loss == "orpo":
            p_w, p_l = math.exp(pc / nc), math.exp(pr / nr)
            values.append(-log_sigmoid(math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))))
    return values


@pytest.mark.parametrize("loss, beta, eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0), ("hinge", 0.1, 0.0),
    ("hinge", 2.0, 0.0), ("robust", 0.1, 0.1), ("robust", 1.0, 0.3), ("orpo", 0.1, 0.0),
])
def test_each_loss_equals_its_formula(loss, beta, eps):
    losses, chosen_rewards, rejected_rewards = preference_losses(
        loss, beta, eps, POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)
    assert losses.tolist() == pytest.approx(by_hand(loss, beta, eps), rel=1e-5, abs=1e-6)
    if loss == "orpo":  # no reference: the rewards are beta * the average token log-prob (as TRL logs them)
        assert chosen_rewards.tolist() == pytest.approx((beta * POLICY_CHOSEN / CHOSEN_TOKENS).tolist())
    else:
        assert chosen_rewards.tolist() == pytest.approx((beta * (POLICY_CHOSEN - REF_CHOSEN)).tolist())
        assert rejected_rewards.tolist() == pytest.approx((beta * (POLICY_REJECTED - REF_REJECTED)).tolist())


def test_loss_shapes_that_define_the_variants():
    h = torch.linspace(-50, 50, 101)
    # hinge: no gradient once the margin beta * h passes 1
    assert hinge_loss(h, 0.1)[h > 10].eq(0).all() and hinge_loss(h, 0.1)[h < 10].gt(0).all()
    # ipo: minimal exactly at the target 1 / (2 beta), growing on both sides
    assert ipo_loss(torch.tensor([5.0]), 0.1).item() == 0 and ipo_loss(torch.tensor([4.0, 6.0]), 0.1).tolist() == [1, 1]
    # conservative DPO keeps a finite optimum; plain DPO decreases forever
    assert sigmoid_loss(h, 0.1, 0.1).argmin() < len(h) - 1 and sigmoid_loss(h, 0.1).diff().lt(0).all()
    # robust DPO with eps = 0 is DPO; it rejects eps >= 0.5, where its estimator divides by 1 - 2 eps <= 0
    assert torch.allclose(robust_loss(h, 0.1, 0.0), sigmoid_loss(h, 0.1))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        robust_loss(h, 0.1, 0.5)
    # ORPO: finite even for an answer the model is certain of (average log-prob 0)
    assert torch.isfinite(orpo_odds_ratio_loss(torch.tensor([0.0, -1e-9]), torch.tensor([-3.0, -3.0]))).all()


def trl_dpo_loss(loss_type: str, beta: float, label_smoothing: float, token_logps: torch.Tensor, mask: torch.Tensor,
                 ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> float:
    """TRL 1.16's own DPO loss code (`DPOTrainer._compute_loss`, which has no standalone loss function) on the given
    per-token log-probs: the trainer and the model are stand-ins that hand it exactly these numbers."""
    from trl import DPOTrainer

    class Accelerator:
        device = torch.device("cpu")
        gather = gather_for_metrics = staticmethod(lambda x: x)

    outputs = types.SimpleNamespace(log_probs=token_logps * mask, entropy=torch.zeros_like(token_logps),
                                    mean_logits=torch.zeros_like(token_logps), is_top1=torch.zeros_like(mask).bool())
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(),
    )
    completion_mask = F.pad(mask, (1, 0))  # TRL's log_probs[:, t] scores token t + 1
    inputs = {"input_ids": torch.zeros_like(completion_mask).long(), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False).item()


@pytest.mark.parametrize("loss, beta, eps", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
                                             ("hinge", 0.3, 0.0), ("robust", 0.1, 0.2)])
def test_dpo_losses_agree_with_trl(loss, beta, eps):
    generator = torch.Generator().manual_seed(0)
    token_logps = -3 * torch.rand(8, 6, generator=generator)  # 4 chosen rows, then 4 rejected
    mask = torch.ones(8, 6)
    for row, length in enumerate([3, 6, 2, 5, 6, 4, 1, 5]):  # answers of different lengths, padded
        mask[row, length:] = 0
    ref_chosen, ref_rejected = -torch.rand(4, generator=generator) * 10, -torch.rand(4, generator=generator) * 10
    sums, counts = (token_logps * mask).sum(1), mask.sum(1)
    ours, _, _ = preference_losses(loss, beta, eps, sums[:4], sums[4:], ref_chosen, ref_rejected, counts[:4], counts[4:])
    assert ours.mean().item() == pytest.approx(trl_dpo_loss(loss, beta, eps, token_logps, mask, ref_chosen, ref_rejected),
                                               rel=1e-5)


def test_orpo_agrees_with_trl():
    from trl.experimental.orpo import ORPOTrainer

    chosen_avg, rejected_avg = POLICY_CHOSEN / CHOSEN_TOKENS, POLICY_REJECTED / REJECTED_TOKENS
    trainer = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    trl_terms, trl_chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen_avg, rejected_avg)
    losses, chosen_rewards, _ = preference_losses("orpo", 0.25, 0.0, POLICY_CHOSEN, POLICY_REJECTED, None, None,
                                                  CHOSEN_TOKENS, REJECTED_TOKENS)
    # TRL returns beta * log sigma(...) and subtracts it from the NLL; ours is -log sigma(...), weighted by the script
    assert (0.25 * losses).tolist() == pytest.approx((-trl_terms).tolist(), rel=1e-6)
    assert chosen_rewards.tolist() == pytest.approx(trl_chosen_rewards.tolist())


# ----------------------------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    config = Config(name="tiny", block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=32,
                    n_query_groups=2, intermediate_size=64, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
                    bias=False, rotary_percentage=1.0, parallel_residual=False)
    return GPT(config).eval()


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    def side(answer):
        ids = torch.tensor(prompt + answer)
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        return ids, labels

    (ci, cl), (ri, rl) = side(chosen), side(rejected)
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}


PAIRS = [pair([1, 2, 3, 4], [5, 6], [7, 8, 9]), pair([10, 11], [12, 13, 14, 15, 16], [17]),
         pair([20, 21, 22, 23, 24, 25], [26], [27, 28])]


def test_sequence_logps_sum_answer_tokens_only(tiny_gpt):
    batch = collate_pairs(PAIRS)
    with torch.no_grad():
        logps, counts = sequence_logps(tiny_gpt, batch["input_ids"], batch["labels"])
        full = torch.log_softmax(tiny_gpt(batch["input_ids"]).float(), dim=-1)
    assert counts.tolist() == [2, 5, 1, 3, 1, 2]
    for row in range(6):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        expected = sum(full[row, t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)
        assert logps[row].item() == pytest.approx(expected, abs=1e-5)
    # the padding's token id changes nothing
    lengths = [len(p[f"{side}_input_ids"]) for side in ("chosen", "rejected") for p in PAIRS]
    other_pad = batch["input_ids"].clone()
    for row, length in enumerate(lengths):
        other_pad[row, length:] = 42
    with torch.no_grad():
        assert torch.equal(sequence_logps(tiny_gpt, other_pad, batch["labels"])[0], logps)


def test_padded_and_unpadded_batches_give_the_same_logps(tiny_gpt):
    batch = collate_pairs(PAIRS)
    with torch.no_grad():
        batched, _ = sequence_logps(tiny_gpt, batch["input_ids"], batch["labels"])
        for row, (ids, labels) in enumerate(
                [(p[f"{side}_input_ids"], p[f"{side}_labels"]) for side in ("chosen", "rejected") for p in PAIRS]):
            alone, _ = sequence_logps(tiny_gpt, ids.unsqueeze(0), labels.unsqueeze(0))
            assert alone.item() == pytest.approx(batched[row].item(), abs=1e-5)


def test_pair_tokens_are_the_real_tokens_of_the_padded_batch():
    """finetune/dpo.py's tokens/s counts pair_tokens: both sides of every pair, cut, without their padding."""
    for max_seq_length in (7, 100):  # 7 cuts the longest rejected answer
        batch = collate_pairs(PAIRS, max_seq_length=max_seq_length, pad_id=-1)
        real = int((batch["input_ids"] != -1).sum())
        assert pair_tokens(PAIRS, max_seq_length) == real < batch["input_ids"].numel()


def test_collate_cuts_and_orders_chosen_then_rejected():
    batch = collate_pairs(PAIRS, max_seq_length=5)
    assert batch["input_ids"].shape == (6, 5)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5] and batch["input_ids"][3].tolist() == [1, 2, 3, 4, 7]
    assert batch["labels"][4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 17, IGNORE_INDEX, IGNORE_INDEX]


def test_lora_disabled_is_the_base_model(tiny_gpt, tmp_path):
    """The implicit reference of LoRA-DPO equals a separately loaded copy of the base, bit for bit."""
    from model.files import atomic_save_safetensors

    tiny_gpt.config.save(tmp_path)
    atomic_save_safetensors({k: v.contiguous() for k, v in tiny_gpt.state_dict().items()},
                            tmp_path / "lit_model.safetensors")
    base = GPT.from_checkpoint(tmp_path)
    policy = GPT.from_checkpoint(tmp_path)
    inject_lora(policy, LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, projection=True, mlp=True, head=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.endswith(".B"):
                param.normal_(std=0.5)  # a trained adapter: it must be switched off, not merely zero
    batch = collate_pairs(PAIRS)
    with torch.no_grad():
        reference, _ = sequence_logps(base, batch["input_ids"], batch["labels"])
        with lora_disabled(policy):
            disabled, _ = sequence_logps(policy, batch["input_ids"], batch["labels"])
        enabled, _ = sequence_logps(policy, batch["input_ids"], batch["labels"])
    assert torch.equal(disabled, reference)
    assert not torch.allclose(enabled, reference, atol=1e-2)  # and the adapters are back on after the block


def test_reference_cache_key_changes_with_what_the_logps_depend_on(tmp_path):
    data_file = tmp_path / "train.pt"
    key = {"data_sha256": "a", "checkpoint_sha256": "b", "checkpoint_dir": "x", "max_seq_length": 128,
           "dtype": "float32", "quantize": None}
    path = reference_cache_path(data_file, key)
    assert path.parent == tmp_path / "reference" and path.name.startswith("train-")
    assert reference_cache_path(data_file, {**key, "checkpoint_dir": "moved/elsewhere"}) == path
    for change in ({"data_sha256": "c"}, {"checkpoint_sha256": "d"}, {"max_seq_length": 64}, {"dtype": "bfloat16"},
                   {"quantize": "bnb.nf4"}):
        assert reference_cache_path(data_file, {**key, **change}) != path, change
