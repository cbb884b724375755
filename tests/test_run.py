"""Training mechanics (model/training/run.py): metrics.csv survives restarts and kills; weights that do not fit
their config, or are not finite, are one line."""

import csv

import pytest
import torch

from model.config import Config
from model.gpt import GPT
from model.training.run import MetricsLogger, check_weights

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
