"""model/config.py: the named configs, the HF config.json round trip, and model_config.yaml files (old ones
with an `extra:` mapping still load; unknown keys are an error naming them)."""

import pytest
import yaml

from model import Config


def test_named_configs():
    assert Config.from_name("meta-llama/Llama-3.2-1B") == Config.from_name("Llama-3.2-1B")
    mistral = Config.from_name("Mistral-7B-v0.1")
    assert mistral.sliding_window == 4096 and mistral.n_query_groups == 8
    assert Config.from_name("Mistral-7B-Instruct-v0.2").sliding_window is None
    assert Config.from_name("Llama-3.1-8B-Instruct").rope_scaling["type"] == "llama3"
    falcon = Config.from_name("falcon-7b")
    assert falcon.n_query_groups == 1 and falcon.parallel_residual and falcon.shared_attention_norm
    assert Config.from_name("Mixtral-8x7B-Instruct-v0.1").n_expert == 8
    with pytest.raises(ValueError, match="Unknown model name"):
        Config.from_name("Llama-9-1T")


@pytest.mark.parametrize("name", ["Llama-2-70b-chat-hf", "Llama-3.2-1B", "Mistral-7B-v0.1", "Mixtral-8x7B-v0.1", "phi-2",
                                  "Phi-3-mini-128k-instruct", "falcon-7b", "falcon-40b", "SmolLM2-135M"])
def test_named_config_survives_the_hf_config_round_trip(name):
    from model.weights.convert import hf_config_dict

    config = Config.from_name(name)
    derived = Config.from_hf_config(hf_config_dict(config), name=config.name)
    derived.hf_repo = config.hf_repo
    assert derived == config


def test_falcon_new_decoder_architecture_is_a_typed_field_and_old_extra_files_load(tmp_path):
    falcon = Config.from_name("falcon-40b")
    assert falcon.falcon_new_decoder_architecture is True
    assert Config.from_name("falcon-7b").falcon_new_decoder_architecture is False
    falcon.save(tmp_path)
    assert "extra" not in yaml.safe_load((tmp_path / "model_config.yaml").read_text())
    assert Config.from_checkpoint(tmp_path) == falcon

    # a model_config.yaml written when the flag lived in `extra`
    saved = yaml.safe_load((tmp_path / "model_config.yaml").read_text())
    del saved["falcon_new_decoder_architecture"]
    for extra, expected in (({"falcon_new_decoder_architecture": True}, True), ({}, False)):
        (tmp_path / "model_config.yaml").write_text(yaml.safe_dump({**saved, "extra": extra}))
        assert Config.from_checkpoint(tmp_path).falcon_new_decoder_architecture is expected


def test_unknown_config_keys_are_named(tmp_path):
    saved = {"name": "t", "vocab_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 8, "intermediate_size": 16}
    Config(**saved).save(tmp_path)
    for bad, name in (({"n_layers": 2}, "n_layers"), ({"extra": {"sliding": 4}}, "sliding")):
        (tmp_path / "model_config.yaml").write_text(yaml.safe_dump({**saved, **bad}))
        with pytest.raises(ValueError, match=f"unknown config keys .*{name}"):
            Config.from_checkpoint(tmp_path)
