"""Tiny random-init transformers models of every family we support, for the logit-equality tests."""

import transformers

VOCAB = 96


def _llama_like(cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    base.update(kw)
    return cls(**base)


def hf_configs() -> dict:
    """name -> (transformers config, sequence length to test with)."""
    T = transformers
    return {
        "llama2": (_llama_like(T.LlamaConfig, num_key_value_heads=4), 16),
        "llama3.1-scaled-rope": (_llama_like(
            T.LlamaConfig, rope_theta=500000.0, max_position_embeddings=256,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}), 48),
        "llama3.2-tied": (_llama_like(T.LlamaConfig, tie_word_embeddings=True, head_dim=32,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}), 24),
        "smollm2": (_llama_like(T.LlamaConfig, num_attention_heads=3, num_key_value_heads=1, hidden_size=48,
                                tie_word_embeddings=True, rope_theta=100000.0), 16),
        "mistral-sliding-window": (_llama_like(T.MistralConfig, sliding_window=5), 20),
        "mixtral": (_llama_like(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=None), 16),
        "phi-1.5": (T.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128), 16),
        "phi-2": (T.PhiConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=128), 16),
        "phi-3-4k": (_llama_like(T.Phi3Config, num_key_value_heads=4, sliding_window=7, pad_token_id=None), 20),
        "phi-3-128k-longrope": (_llama_like(
            T.Phi3Config, num_key_value_heads=4, pad_token_id=None, max_position_embeddings=256,
            original_max_position_embeddings=32, sliding_window=None,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                          "long_factor": [2.0 + 0.5 * i for i in range(8)]}), 40),
        "falcon-7b": (T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
                                     alibi=False, max_position_embeddings=128), 16),
        "falcon-40b": (T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_kv_heads=2, new_decoder_architecture=True, bias=False, alibi=False,
                                      max_position_embeddings=128), 16),
    }


def save_tiny_model(name: str, directory, seed: int = 0, **overrides):
    import torch

    config, seq_len = hf_configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random norms and biases so a swapped weight cannot go unnoticed
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model, seq_len
