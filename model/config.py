"""Model configuration: one dataclass and one table of named configs.

A config says everything the GPT in `gpt.py` needs to build a family's architecture. Named configs carry the
Hugging Face repo they come from (`hf_repo`), so `Config.from_name("Llama-3.2-1B")` and
`Config.from_name("meta-llama/Llama-3.2-1B")` are the same. A checkpoint of an architecture we support but whose
name is not in the table (a fine-tune, a tiny test model) gets its config from its HF `config.json` through
`Config.from_hf_config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

HF_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "FalconForCausalLM",
)


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""
    # the transformers class this architecture converts to and from (one of HF_ARCHITECTURES)
    hf_architecture: str = "LlamaForCausalLM"
    block_size: int = 4096
    vocab_size: int = 32000
    n_layer: int = 16
    n_head: int = 32
    n_embd: int = 4096
    # 1 = multi-query attention, n_head = multi-head attention, anything between = grouped-query attention
    n_query_groups: Optional[int] = None
    head_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    norm_eps: float = 1e-5
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP", "LLaMAMoE"] = "LLaMAMLP"
    gelu_approximate: Literal["none", "tanh"] = "none"
    # bias on the attention and MLP linears / on the output head
    bias: bool = False
    lm_head_bias: bool = False
    # parallel_residual: x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-J, Falcon, Phi) instead of two sequential steps;
    # shared_attention_norm: the MLP reads norm_1's output too (Falcon-7B, Phi), so there is no norm_2
    parallel_residual: bool = False
    shared_attention_norm: bool = False
    tie_embeddings: bool = False
    # RoPE over the first `rotary_percentage` of each head's dimensions (Phi: 0.4-0.5)
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"} (Llama 3.1+) or
    # {"type": "longrope", "short_factor", "long_factor", "original_max_seq_len", "attention_factor"} (Phi-3 128k)
    rope_scaling: Optional[dict] = None
    # a token attends to at most the `sliding_window` most recent tokens, itself included (Mistral v0.1, Phi-3)
    sliding_window: Optional[int] = None
    n_expert: int = 0
    n_expert_per_token: int = 0
    # Falcon-40B/180B's layout in transformers: a fused QKV grouped per KV head and, with two norms, ln_attn/ln_mlp
    falcon_new_decoder_architecture: bool = False

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp_class_name != "GptNeoxMLP":
                raise ValueError(f"{self.name}: {self.mlp_class_name} needs `intermediate_size`")
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_query_groups:
            raise ValueError(f"{self.name}: n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")
        if self.hf_architecture not in HF_ARCHITECTURES:
            raise ValueError(f"{self.name}: hf_architecture must be one of {HF_ARCHITECTURES}, got {self.hf_architecture!r}")

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A named config, by its name ("Llama-3.2-1B") or its HF repo id ("meta-llama/Llama-3.2-1B")."""
        entry = name_to_config.get(name) or hf_repo_to_config.get(name)
        if entry is None:
            raise ValueError(
                f"Unknown model name {name!r}. Run `python scripts/download.py --repo_id list` to see the supported"
                " models, or convert any checkpoint of a supported architecture by its HF config.json."
            )
        return replace(entry, **overrides)

    @classmethod
    def from_file(cls, path: Path | str, **overrides: Any) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found. Convert the checkpoint first: `python scripts/convert_hf_checkpoint.py"
                f" --checkpoint_dir {path.parent}`"
            )
        with open(path, encoding="utf-8") as fp:
            data = yaml.safe_load(fp)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a model config (expected a YAML mapping)")
        # model_config.yaml files written before the field was typed hold it in an `extra` mapping
        extra = data.pop("extra", None) or {}
        if not isinstance(extra, dict) or set(extra) - {"falcon_new_decoder_architecture"}:
            raise ValueError(f"{path}: unknown config keys {sorted(extra) if isinstance(extra, dict) else ['extra']}")
        data.update(extra)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        data.update(overrides)
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str, **overrides: Any) -> "Config":
        return cls.from_file(Path(checkpoint_dir) / "model_config.yaml", **overrides)

    def save(self, checkpoint_dir: Path | str) -> None:
        from model.files import atomic_write_text

        atomic_write_text(Path(checkpoint_dir) / "model_config.yaml", yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_hf_config(cls, hf_config: dict | Path | str, name: str = "") -> "Config":
        """Derive our config from a transformers `config.json` (a dict or a path to the file)."""
        if not isinstance(hf_config, dict):
            with open(hf_config, encoding="utf-8") as fp:
                hf_config = json.load(fp)
        archs = hf_config.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in HF_ARCHITECTURES:
            raise ValueError(
                f"Unsupported architecture {arch or hf_config.get('model_type')!r}. Supported: {', '.join(HF_ARCHITECTURES)}"
            )
        c = hf_config
        # Falcon's original config.json names some fields differently
        n_head = c.get("num_attention_heads") or c["n_head"]
        common = dict(
            name=name or c.get("_name_or_path", "") or arch,
            hf_architecture=arch,
            vocab_size=c["vocab_size"],
            n_layer=c.get("num_hidden_layers") or c["n_layer"],
            n_head=n_head,
            n_embd=c["hidden_size"],
            # Falcon ties its embeddings unless told otherwise
            tie_embeddings=bool(c.get("tie_word_embeddings", arch == "FalconForCausalLM")),
        )
        rope = _hf_rope_parameters(c)
        if arch == "FalconForCausalLM":
            if c.get("alibi"):
                raise ValueError("Falcon checkpoints with ALiBi positions are not supported (only rotary Falcon models)")
            new_arch = c.get("new_decoder_architecture", False)
            if new_arch:
                n_query_groups = c.get("num_kv_heads") or c.get("n_head_kv") or n_head
            elif c.get("multi_query", True):
                n_query_groups = 1
            else:
                n_query_groups = n_head
            parallel = new_arch or c.get("parallel_attn", True)
            n_ln = c.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
            return cls(
                **common,
                block_size=c.get("max_position_embeddings", 2048),
                n_query_groups=n_query_groups,
                norm_class_name="LayerNorm",
                norm_eps=c.get("layer_norm_epsilon", 1e-5),
                mlp_class_name="GptNeoxMLP",
                intermediate_size=c.get("ffn_hidden_size") or 4 * c["hidden_size"],
                bias=bool(c.get("bias", False)),
                parallel_residual=parallel,
                shared_attention_norm=parallel and n_ln == 1,
                rope_base=rope["theta"],
                falcon_new_decoder_architecture=bool(new_arch),
            )
        if arch == "PhiForCausalLM":
            if c.get("qk_layernorm"):
                raise ValueError("Phi checkpoints with qk_layernorm are not supported")
            return cls(
                **common,
                block_size=c.get("max_position_embeddings", 2048),
                n_query_groups=c.get("num_key_value_heads") or n_head,
                norm_class_name="LayerNorm",
                norm_eps=c.get("layer_norm_eps", 1e-5),
                mlp_class_name="GptNeoxMLP",
                gelu_approximate="tanh" if c.get("hidden_act", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh") else "none",
                intermediate_size=c["intermediate_size"],
                bias=True,
                lm_head_bias=True,
                parallel_residual=True,
                shared_attention_norm=True,
                rotary_percentage=rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5)),
                rope_base=rope["theta"],
            )
        # the Llama family: Llama, Mistral, Mixtral, Phi-3
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={c['hidden_act']!r} is not supported for {arch} (only silu)")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{arch} checkpoints with attention_bias/mlp_bias are not supported")
        rope_scaling = None
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type == "llama3":
            rope_scaling = {
                "type": "llama3",
                "factor": rope["factor"],
                "low_freq_factor": rope["low_freq_factor"],
                "high_freq_factor": rope["high_freq_factor"],
                "original_max_seq_len": rope["original_max_position_embeddings"],
            }
        elif rope_type in ("longrope", "su"):
            original = c.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
            rope_scaling = {
                "type": "longrope",
                "short_factor": list(rope["short_factor"]),
                "long_factor": list(rope["long_factor"]),
                "original_max_seq_len": original,
                "attention_factor": rope.get("attention_factor"),
                "factor": c.get("max_position_embeddings", original) / original,
            }
        elif rope_type != "default":
            raise ValueError(f"RoPE scaling type {rope_type!r} is not supported")
        n_expert = c.get("num_local_experts", 0) if arch == "MixtralForCausalLM" else 0
        return cls(
            **common,
            block_size=c.get("max_position_embeddings", 4096),
            n_query_groups=c.get("num_key_value_heads") or n_head,
            head_size=c.get("head_dim") or c["hidden_size"] // n_head,
            intermediate_size=c["intermediate_size"],
            norm_class_name="RMSNorm",
            norm_eps=c.get("rms_norm_eps", 1e-6),
            mlp_class_name="LLaMAMoE" if n_expert else "LLaMAMLP",
            n_expert=n_expert,
            n_expert_per_token=c.get("num_experts_per_tok", 0) if n_expert else 0,
            rope_base=rope["theta"],
            rope_scaling=rope_scaling,
            rotary_percentage=rope.get("partial_rotary_factor", 1.0),
            sliding_window=c.get("sliding_window") if arch != "LlamaForCausalLM" else None,
        )


def _hf_rope_parameters(c: dict) -> dict:
    """RoPE settings from an HF config, in either the transformers 4 (`rope_theta` + `rope_scaling`) or the
    transformers 5 (`rope_parameters`) layout."""
    params = dict(c.get("rope_parameters") or {})
    params.update(c.get("rope_scaling") or {})
    params.setdefault("theta", params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if "partial_rotary_factor" not in params and "partial_rotary_factor" in c:
        params["partial_rotary_factor"] = c["partial_rotary_factor"]
    return params


def _llama2(size, n_layer, n_head, n_embd, intermediate_size, n_query_groups=None):
    base = dict(
        block_size=4096, vocab_size=32000, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        n_query_groups=n_query_groups, intermediate_size=intermediate_size, norm_eps=1e-5,
    )
    return [
        dict(name=f"Llama-2-{size}-hf", hf_repo=f"meta-llama/Llama-2-{size.lower()}-hf", **base),
        dict(name=f"Llama-2-{size}-chat-hf", hf_repo=f"meta-llama/Llama-2-{size.lower()}-chat-hf", **base),
    ]


def _base_and_instruct(name, repo, instruct_suffix="-Instruct", instruct_name=None, **kwargs):
    """A base model and its instruct/chat sibling, named `{name}{instruct_suffix}` unless `instruct_name` is given."""
    instruct_name = instruct_name or f"{name}{instruct_suffix}"
    return [
        dict(name=name, hf_repo=repo, **kwargs),
        dict(name=instruct_name, hf_repo=f"{repo.split('/')[0]}/{instruct_name}", **kwargs),
    ]


_LLAMA3 = dict(vocab_size=128256, rope_base=500000.0, norm_eps=1e-5)
_LLAMA31_SCALING = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA32_SCALING = dict(_LLAMA31_SCALING, factor=32.0)
_MISTRAL = dict(
    hf_architecture="MistralForCausalLM", vocab_size=32000, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096,
    intermediate_size=14336, block_size=32768, norm_eps=1e-5,
)
_FALCON = dict(
    hf_architecture="FalconForCausalLM", vocab_size=65024, block_size=2048, norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP", parallel_residual=True, tie_embeddings=True, bias=False,
)
_PHI = dict(
    hf_architecture="PhiForCausalLM", vocab_size=51200, block_size=2048, norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP", gelu_approximate="tanh", bias=True, lm_head_bias=True, parallel_residual=True,
    shared_attention_norm=True,
)
_PHI3 = dict(
    hf_architecture="Phi3ForCausalLM", vocab_size=32064, n_layer=32, n_head=32, n_embd=3072, intermediate_size=8192,
    norm_eps=1e-5,
)
_PHI3_128K_LONGROPE = dict(
    type="longrope", original_max_seq_len=4096, factor=32.0, attention_factor=None,
    long_factor=[
        1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
        1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268,
        6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918,
        14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
        38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664,
        54.9373893737793, 56.89738845825195, 57.28738784790039, 59.98738479614258, 60.86738586425781,
        60.887386322021484, 61.71739196777344, 62.91739273071289, 62.957393646240234, 63.41739273071289,
        63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
        64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688,
        64.57435607910156, 64.69000244140625, 64.76000213623047,
    ],
    short_factor=[
        1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
        1.5500000000000005, *[2.000000000000001] * 17, *[2.0500000000000007] * 6, 2.1000000000000005,
        2.1000000000000005, 2.1500000000000004, *[2.25] * 5, 2.3999999999999995, 2.4499999999999993,
        2.499999999999999, 2.6999999999999984, 2.6999999999999984, 2.7499999999999982, 2.799999999999998,
        2.8999999999999977, 3.049999999999997,
    ],
)
_SMOLLM2 = dict(vocab_size=49152, block_size=8192, tie_embeddings=True, norm_eps=1e-5)

configs: list[dict] = [
    # Llama 2
    *_llama2("7b", 32, 32, 4096, 11008),
    *_llama2("13b", 40, 40, 5120, 13824),
    *_llama2("70b", 80, 64, 8192, 28672, n_query_groups=8),
    # Llama 3, 3.1, 3.2
    *_base_and_instruct("Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", block_size=8192, n_layer=32, n_head=32,
                        n_query_groups=8, n_embd=4096, intermediate_size=14336, **_LLAMA3),
    *_base_and_instruct("Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B", block_size=8192, n_layer=80, n_head=64,
                        n_query_groups=8, n_embd=8192, intermediate_size=28672, **_LLAMA3),
    *_base_and_instruct("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", block_size=131072, n_layer=32, n_head=32,
                        n_query_groups=8, n_embd=4096, intermediate_size=14336, rope_scaling=_LLAMA31_SCALING, **_LLAMA3),
    *_base_and_instruct("Llama-3.1-70B", "meta-llama/Llama-3.1-70B", block_size=131072, n_layer=80, n_head=64,
                        n_query_groups=8, n_embd=8192, intermediate_size=28672, rope_scaling=_LLAMA31_SCALING, **_LLAMA3),
    *_base_and_instruct("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", block_size=131072, n_layer=16, n_head=32,
                        n_query_groups=8, n_embd=2048, head_size=64, intermediate_size=8192, tie_embeddings=True,
                        rope_scaling=_LLAMA32_SCALING, **_LLAMA3),
    *_base_and_instruct("Llama-3.2-3B", "meta-llama/Llama-3.2-3B", block_size=131072, n_layer=28, n_head=24,
                        n_query_groups=8, n_embd=3072, head_size=128, intermediate_size=8192, tie_embeddings=True,
                        rope_scaling=_LLAMA32_SCALING, **_LLAMA3),
    # Mistral: v0.1 uses a 4096-token sliding window; v0.2 and v0.3 attend to the full context
    *_base_and_instruct("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", instruct_name="Mistral-7B-Instruct-v0.1",
                        sliding_window=4096, **_MISTRAL),
    dict(name="Mistral-7B-v0.2", hf_repo="mistral-community/Mistral-7B-v0.2", rope_base=1000000.0, **_MISTRAL),
    dict(name="Mistral-7B-Instruct-v0.2", hf_repo="mistralai/Mistral-7B-Instruct-v0.2", rope_base=1000000.0, **_MISTRAL),
    *_base_and_instruct("Mistral-7B-v0.3", "mistralai/Mistral-7B-v0.3", instruct_name="Mistral-7B-Instruct-v0.3",
                        rope_base=1000000.0,
                        **dict(_MISTRAL, vocab_size=32768)),
    # Mixtral: 8 experts, 2 per token
    *_base_and_instruct("Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", instruct_name="Mixtral-8x7B-Instruct-v0.1",
                        rope_base=1000000.0,
                        **dict(_MISTRAL, hf_architecture="MixtralForCausalLM", mlp_class_name="LLaMAMoE", n_expert=8,
                               n_expert_per_token=2)),
    # Phi
    dict(name="phi-1_5", hf_repo="microsoft/phi-1_5", n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192,
         rotary_percentage=0.5, **_PHI),
    dict(name="phi-2", hf_repo="microsoft/phi-2", n_layer=32, n_head=32, n_embd=2560, intermediate_size=10240,
         rotary_percentage=0.4, **_PHI),
    dict(name="Phi-3-mini-4k-instruct", hf_repo="microsoft/Phi-3-mini-4k-instruct", block_size=4096,
         sliding_window=2047, **_PHI3),
    # Phi-3 128k: LongRoPE, one rescale factor per rotated frequency (short within 4k tokens, long beyond)
    dict(name="Phi-3-mini-128k-instruct", hf_repo="microsoft/Phi-3-mini-128k-instruct", block_size=131072,
         sliding_window=262144, rope_scaling=_PHI3_128K_LONGROPE, **_PHI3),
    # Falcon: 7B is multi-query with one shared norm; 40B/180B are grouped-query with separate attention/MLP norms
    *_base_and_instruct("falcon-7b", "tiiuae/falcon-7b", instruct_suffix="-instruct", n_layer=32, n_head=71,
                        n_embd=4544, n_query_groups=1, shared_attention_norm=True, intermediate_size=18176, **_FALCON),
    *_base_and_instruct("falcon-40b", "tiiuae/falcon-40b", instruct_suffix="-instruct", n_layer=60, n_head=128,
                        n_embd=8192, n_query_groups=8, intermediate_size=32768,
                        falcon_new_decoder_architecture=True, **_FALCON),
    *_base_and_instruct("falcon-180B", "tiiuae/falcon-180B", instruct_suffix="-chat", n_layer=80, n_head=232,
                        n_embd=14848, n_query_groups=8, intermediate_size=59392,
                        falcon_new_decoder_architecture=True, **_FALCON),
    # TinyLlama
    dict(name="TinyLlama-1.1B-intermediate-step-1431k-3T", hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
         block_size=2048, vocab_size=32000, n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    dict(name="TinyLlama-1.1B-Chat-v1.0", hf_repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", block_size=2048,
         vocab_size=32000, n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    # SmolLM2
    *_base_and_instruct("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", n_layer=30, n_head=9, n_query_groups=3, n_embd=576,
                        intermediate_size=1536, rope_base=100000.0, **_SMOLLM2),
    *_base_and_instruct("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M", n_layer=32, n_head=15, n_query_groups=5, n_embd=960,
                        intermediate_size=2560, rope_base=100000.0, **_SMOLLM2),
    *_base_and_instruct("SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B", n_layer=24, n_head=32, n_query_groups=32,
                        n_embd=2048, intermediate_size=8192, rope_base=130000.0, **_SMOLLM2),
]

name_to_config: dict[str, Config] = {c["name"]: Config(**c) for c in configs}
hf_repo_to_config: dict[str, Config] = {c.hf_repo: c for c in name_to_config.values()}
