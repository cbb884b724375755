"""RoPE frequencies stay float32 whatever casts the model: a bf16-true run rotates by the angles evaluation uses."""

import torch
from lightning_fabric import Fabric

from model import GPT, Config


def tiny_config() -> Config:
    return Config(name="tiny", vocab_size=64, n_layer=1, n_head=4, n_embd=64, intermediate_size=96, block_size=8192,
                  rope_base=500000, rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_seq_len=8192))


def test_a_bf16_true_run_uses_the_float32_angles_of_evaluation():
    positions = torch.arange(0, 8192, 97)
    expected_cos, expected_sin = GPT(tiny_config()).rope(positions)
    model = Fabric(accelerator="cpu", devices=1, precision="bf16-true").setup_module(GPT(tiny_config()))
    assert next(model.parameters()).dtype == torch.bfloat16
    cos, sin = model.module.rope(positions)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, expected_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin, expected_sin, atol=0, rtol=0)
    # what a bf16 buffer would have given: angles off by radians at long distances
    bf16_angles = positions.float().unsqueeze(-1) * model.module.inv_freq(torch.device("cpu")).bfloat16().float()
    assert (torch.cat((bf16_angles, bf16_angles), -1).cos() - expected_cos).abs().max() > 0.1


def test_the_frequencies_are_no_buffer_and_follow_the_device_of_the_positions():
    model = GPT(tiny_config()).to(torch.float16)
    assert not any("freq" in name for name, _ in model.named_buffers())
    assert "inv_freq" not in str(model.state_dict().keys())
    assert model.inv_freq(torch.device("cpu")).dtype == torch.float32
    model.reset_rope()
    assert not model.rope_cache
    model.reset_rope("cpu")
    assert list(model.rope_cache) == [(torch.device("cpu"), False)]
