"""Training mechanics (model/training/run.py): metrics.csv survives restarts and kills; weights that do not fit
their config, or are not finite, are one line; length-grouped micro-batches; real-token throughput."""

import csv

import pytest
import torch

from model.config import Config
from model.data.sft import get_collate_fn, get_packed_collate_fn, pack_samples
from model.gpt import GPT
from model.training.run import MetricsLogger, Throughput, check_weights, epoch_batches

FIELDS = ["step", "loss"]


def rows(path):
    with open(path, newline="") as fp:
        return [r["step"] for r in csv.DictReader(fp)]


def test_a_kill_while_metrics_are_rewritten_loses_no_row(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, FIELDS, resume_step=None)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step})
    before = (tmp_path / "metrics.csv").read_bytes()

    def killed(self, rows):
        raise KeyboardInterrupt  # the process dies while the kept rows are being written

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, FIELDS, resume_step=4)
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_last_row(tmp_path):
    logger = MetricsLogger(tmp_path, FIELDS, resume_step=None)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 0.5})
    with open(tmp_path / "metrics.csv", "a") as fp:
        fp.write("6,0.")  # killed mid-append
    MetricsLogger(tmp_path, FIELDS, resume_step=10)
    assert rows(tmp_path / "metrics.csv") == ["1", "2", "3", "4", "5"]
    MetricsLogger(tmp_path, FIELDS, resume_step=3)
    assert rows(tmp_path / "metrics.csv") == ["1", "2", "3"]


@pytest.fixture
def tiny():
    config = Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, block_size=8, intermediate_size=16)
    torch.manual_seed(0)
    return GPT(config), config


def test_weights_that_do_not_fit_the_config_are_one_line(tiny, tmp_path):
    model, config = tiny
    state_dict = dict(model.state_dict())
    check_weights(model, state_dict, tmp_path)
    wider = {**state_dict, "transformer.wte.weight": torch.zeros(16, 12)}
    with pytest.raises(ValueError, match=r"model_config.yaml does not match the weights: transformer.wte.weight is"
                                         r" \[16, 12\] in the weights, \[16, 8\] in the config"):
        check_weights(model, wider, tmp_path)
    fewer = {k: v for k, v in state_dict.items() if not k.startswith("transformer.h.0.attn")}
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.* is missing; \d+ missing, 0 unexpected tensors"):
        check_weights(model, fewer, tmp_path)


def test_nan_or_inf_in_the_weights_is_named(tiny, tmp_path):
    model, _ = tiny
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict["transformer.h.0.mlp.fc_1.weight"][0, :3] = float("nan")
    state_dict["transformer.h.0.mlp.fc_1.weight"][1, 0] = float("inf")
    name = next(k for k in state_dict if k.startswith("transformer.h.0.mlp"))
    with pytest.raises(ValueError, match=rf"{tmp_path}: the weights hold NaN/inf values"):
        check_weights(model, state_dict, tmp_path)
    assert name


def test_hparams_with_validated_numbers_are_plain_yaml(tmp_path):
    import yaml

    from model.cli import NonNegativeInt, PositiveInt
    from model.training.run import save_hparams

    save_hparams(tmp_path, {"max_steps": PositiveInt(3), "warmup_steps": NonNegativeInt(0), "out_dir": tmp_path,
                            "flag": True})
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text()) == {"max_steps": 3, "warmup_steps": 0,
                                                                      "out_dir": str(tmp_path), "flag": True}


# ----------------------------------------------------------------------------------------------- batch order


def sft_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths shaped like instruction data: log-normal (median ~150 tokens, a long tail), cut at 2048."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.empty(n).log_normal_(mean=5.0, std=0.8, generator=generator)
    return [int(min(max(length, 8), 2048)) for length in lengths]


def computed_positions(lengths: list[int], batches: list[list[int]]) -> int:
    """The positions the micro-batches compute: each padded to its longest sample."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_an_epoch_holds_every_sample_once_and_is_a_function_of_seed_and_epoch(group_by_length):
    lengths = sft_lengths(1003)  # not a multiple of the micro-batch: the last micro-batch is short
    for epoch in range(3):
        batches = epoch_batches(lengths, 8, epoch, seed=7, group_by_length=group_by_length)
        assert sorted(i for batch in batches for i in batch) == list(range(1003))
        assert len(batches) == 126 and sorted(len(b) for b in batches)[0] == 3
        # the batch with the longest sample comes first: out of memory at step 1, not hours in
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        # what a resumed run recomputes: the same batches from the same seed and epoch
        assert epoch_batches(lengths, 8, epoch, seed=7, group_by_length=group_by_length) == batches
    assert epoch_batches(lengths, 8, 0, 7, group_by_length) != epoch_batches(lengths, 8, 1, 7, group_by_length)
    assert epoch_batches(lengths, 8, 0, 7, group_by_length) != epoch_batches(lengths, 8, 0, 8, group_by_length)


def test_length_grouping_computes_far_less_padding_and_keeps_the_order_random():
    lengths = sft_lengths(4000)
    real = sum(lengths)
    plain = computed_positions(lengths, epoch_batches(lengths, 8, 0, seed=1, group_by_length=False))
    grouped_batches = epoch_batches(lengths, 8, 0, seed=1, group_by_length=True)
    grouped = computed_positions(lengths, grouped_batches)
    # a plain shuffle pads every micro-batch to its longest sample: 2.6x the real tokens at these lengths; grouped
    # micro-batches compute 1.09x (their window of 400 samples still holds some spread at the long tail)
    assert plain > 2.2 * real
    assert grouped < 1.15 * real and grouped < 0.5 * plain, (real, plain, grouped)
    # still shuffled: the micro-batches do not come in order of length, and neighbours are not one sorted run
    longest = [max(lengths[i] for i in batch) for batch in grouped_batches]
    assert longest[1:] != sorted(longest[1:], reverse=True) and longest[1:] != sorted(longest[1:])
    # and each micro-batch mixes samples from across its window of the shuffled data, not neighbours by index
    assert sum(max(batch) - min(batch) for batch in grouped_batches) / len(grouped_batches) > 100


# ----------------------------------------------------------------------------------------------- throughput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tokens_per_s_leaves_out_validation_and_saving_but_the_eta_does_not():
    clock = FakeClock()
    throughput = Throughput(start_step=10, max_steps=20, clock=clock)
    with throughput.paused():  # the validation before the first step
        clock.now += 5.0
    for _ in range(2):  # two steps of 1000 real tokens, 2 s each, then a validation and a save of 3 s in all
        clock.now += 2.0
        throughput.update(1000)
        with throughput.paused():
            clock.now += 1.0
        with throughput.paused():
            clock.now += 2.0
    assert throughput.tokens_per_s() == pytest.approx(2000 / 4.0)
    # 2 steps took 5 + 2 x 5 = 15 s of wall-clock time: the 8 steps left take 60 s at that pace
    assert throughput.eta_s(step=12) == pytest.approx(15.0 / 2 * 8)
    line = throughput.line(12, loss=1.5, lr=1e-3, memory_gb=0.5)
    assert "| 500 tok/s |" in line and "ETA 1m00s" in line


def test_the_lengths_the_scripts_count_are_the_real_tokens_of_a_padded_batch():
    """The SFT scripts count `lengths[i]` (each sample's length cut to max_seq_length, a pack's total) per
    micro-batch: that is the batch's tokens without its padding, unpacked or packed."""
    generator = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(1, 100, (n,), generator=generator),
                "labels": torch.randint(1, 100, (n,), generator=generator)} for n in (5, 17, 9, 30, 2, 12)]
    max_seq_length = 20
    lengths = [min(len(s["input_ids"]), max_seq_length) for s in samples]
    batch = get_collate_fn(pad_id=-1, max_seq_length=max_seq_length)(samples)
    assert batch["input_ids"].numel() == 6 * 20 and int((batch["input_ids"] != -1).sum()) == sum(lengths)

    packs = pack_samples(lengths, max_seq_length)
    pack_lengths = [sum(lengths[i] for i in pack) for pack in packs]
    packed = get_packed_collate_fn(pad_id=-1, max_seq_length=max_seq_length)([[samples[i] for i in p] for p in packs])
    assert packed["input_ids"].numel() > sum(pack_lengths)  # rows of unequal totals are padded too
    assert int((packed["input_ids"] != -1).sum()) == sum(pack_lengths) == sum(lengths)
