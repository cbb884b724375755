"""Hugging Face <-> Forge: one weight-map table per family drives both conversion directions, the config
derived from `config.json`, and streamed conversion into a checkpoint directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from model.config import Config
from model.device import parse_dtype
from model.gpt import GPT
from model.prompts import (
    PromptStyle,
    has_prompt_style,
    load_prompt_style,
    save_prompt_style,
)
from model.weights.checkpoint import save_sharded


class WeightMap:
    """Some of our tensors, the HF tensors they are made of, and the two functions that convert between the lists
    (identity for a plain rename; concatenation/splitting for fused projections)."""

    def __init__(self, lit: str | list[str], hf: str | list[str], to_lit: Callable = None, to_hf: Callable = None):
        self.lit = [lit] if isinstance(lit, str) else lit
        self.hf = [hf] if isinstance(hf, str) else hf
        self.to_lit = to_lit or (lambda tensors: tensors)
        self.to_hf = to_hf or (lambda tensors: tensors)


def _fuse(sizes: tuple[int, ...]) -> tuple[Callable, Callable]:
    """Several tensors stacked along the output dimension, in order, <-> one fused tensor."""
    return (lambda ts: [torch.cat(ts, dim=0)]), (lambda ts: list(ts[0].split(sizes, dim=0)))


def _split(sizes: tuple[int, ...]) -> tuple[Callable, Callable]:
    to_hf, to_lit = _fuse(sizes)
    return to_lit, to_hf


def _falcon_qkv(config: Config) -> tuple[Callable, Callable]:
    """Falcon fuses q, k, v per key/value group: [q_1..q_m, k, v] for each group (new architecture, and old
    multi-head with m=1), or [all q, k, v] for multi-query, which is already our layout."""
    n_head, groups, hs = config.n_head, config.n_query_groups, config.head_size
    new_arch = config.falcon_new_decoder_architecture
    if groups == 1 and not new_arch:
        return (lambda ts: ts), (lambda ts: ts)
    q_per_kv = n_head // groups

    def to_lit(ts):
        t = ts[0]
        grouped = t.reshape(groups, q_per_kv + 2, hs, -1)
        q, k, v = grouped[:, :q_per_kv], grouped[:, q_per_kv], grouped[:, q_per_kv + 1]
        return [torch.cat([q.reshape(n_head * hs, -1), k.reshape(groups * hs, -1), v.reshape(groups * hs, -1)]).reshape(-1, *t.shape[1:])]

    def to_hf(ts):
        t = ts[0].reshape(ts[0].size(0), -1)
        q, k, v = t.split((n_head * hs, groups * hs, groups * hs))
        fused = torch.cat([q.reshape(groups, q_per_kv, hs, -1), k.reshape(groups, 1, hs, -1), v.reshape(groups, 1, hs, -1)], dim=1)
        return [fused.reshape(-1, *ts[0].shape[1:])]

    return to_lit, to_hf


def weight_maps(config: Config) -> list[WeightMap]:
    """Every tensor of our model and where it comes from in the HF checkpoint of `config.hf_architecture`."""
    arch = config.hf_architecture
    maps: list[WeightMap] = []
    suffixes = ("weight", "bias") if config.bias else ("weight",)
    norm_suffixes = ("weight", "bias") if config.norm_class_name == "LayerNorm" else ("weight",)

    if arch == "FalconForCausalLM":
        maps.append(WeightMap("transformer.wte.weight", ["transformer.word_embeddings.weight"]))
        for i in range(config.n_layer):
            hf, lit = f"transformer.h.{i}", f"transformer.h.{i}"
            if config.falcon_new_decoder_architecture and not config.shared_attention_norm:
                norms = [("norm_1", "ln_attn"), ("norm_2", "ln_mlp")]
            elif config.shared_attention_norm:
                norms = [("norm_1", "input_layernorm")]
            else:
                norms = [("norm_1", "input_layernorm"), ("norm_2", "post_attention_layernorm")]
            for ours, theirs in norms:
                maps += [WeightMap(f"{lit}.{ours}.{s}", f"{hf}.{theirs}.{s}") for s in norm_suffixes]
            to_lit, to_hf = _falcon_qkv(config)
            for s in suffixes:
                maps.append(WeightMap(f"{lit}.attn.qkv.{s}", f"{hf}.self_attention.query_key_value.{s}", to_lit, to_hf))
                maps.append(WeightMap(f"{lit}.attn.proj.{s}", [f"{hf}.self_attention.dense.{s}"]))
                maps.append(WeightMap(f"{lit}.mlp.fc.{s}", [f"{hf}.mlp.dense_h_to_4h.{s}"]))
                maps.append(WeightMap(f"{lit}.mlp.proj.{s}", [f"{hf}.mlp.dense_4h_to_h.{s}"]))
        maps += [WeightMap(f"transformer.ln_f.{s}", [f"transformer.ln_f.{s}"]) for s in norm_suffixes]
    else:
        maps.append(WeightMap("transformer.wte.weight", ["model.embed_tokens.weight"]))
        q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
        to_lit, to_hf = _fuse((q_size, kv_size, kv_size))
        for i in range(config.n_layer):
            hf, lit = f"model.layers.{i}", f"transformer.h.{i}"
            maps += [WeightMap(f"{lit}.norm_1.{s}", [f"{hf}.input_layernorm.{s}"]) for s in norm_suffixes]
            if arch == "PhiForCausalLM":
                for s in suffixes:
                    maps.append(WeightMap(f"{lit}.attn.qkv.{s}", [f"{hf}.self_attn.{p}_proj.{s}" for p in "qkv"], to_lit, to_hf))
                    maps.append(WeightMap(f"{lit}.attn.proj.{s}", [f"{hf}.self_attn.dense.{s}"]))
                    maps.append(WeightMap(f"{lit}.mlp.fc.{s}", [f"{hf}.mlp.fc1.{s}"]))
                    maps.append(WeightMap(f"{lit}.mlp.proj.{s}", [f"{hf}.mlp.fc2.{s}"]))
                continue
            maps.append(WeightMap(f"{lit}.norm_2.weight", [f"{hf}.post_attention_layernorm.weight"]))
            maps.append(WeightMap(f"{lit}.attn.proj.weight", [f"{hf}.self_attn.o_proj.weight"]))
            if arch == "Phi3ForCausalLM":
                maps.append(WeightMap(f"{lit}.attn.qkv.weight", f"{hf}.self_attn.qkv_proj.weight"))
                # Phi-3 fuses gate and up projections: [gate; up]
                maps.append(WeightMap([f"{lit}.mlp.fc_1.weight", f"{lit}.mlp.fc_2.weight"], f"{hf}.mlp.gate_up_proj.weight",
                                      *_split((config.intermediate_size, config.intermediate_size))))
                maps.append(WeightMap(f"{lit}.mlp.proj.weight", [f"{hf}.mlp.down_proj.weight"]))
                continue
            maps.append(WeightMap(f"{lit}.attn.qkv.weight", [f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"], to_lit, to_hf))
            if arch == "MixtralForCausalLM":
                moe = f"{hf}.block_sparse_moe"
                maps.append(WeightMap(f"{lit}.mlp.gate.weight", [f"{moe}.gate.weight"]))
                for e in range(config.n_expert):
                    for ours, theirs in (("fc_1", "w1"), ("fc_2", "w3"), ("proj", "w2")):
                        maps.append(WeightMap(f"{lit}.mlp.experts.{e}.{ours}.weight", [f"{moe}.experts.{e}.{theirs}.weight"]))
            else:
                for ours, theirs in (("fc_1", "gate_proj"), ("fc_2", "up_proj"), ("proj", "down_proj")):
                    maps.append(WeightMap(f"{lit}.mlp.{ours}.weight", [f"{hf}.mlp.{theirs}.weight"]))
        final_norm = "model.final_layernorm" if arch == "PhiForCausalLM" else "model.norm"
        maps += [WeightMap(f"transformer.ln_f.{s}", [f"{final_norm}.{s}"]) for s in norm_suffixes]
    if not config.tie_embeddings:
        maps.append(WeightMap("lm_head.weight", ["lm_head.weight"]))
    if config.lm_head_bias:
        maps.append(WeightMap("lm_head.bias", ["lm_head.bias"]))
    return maps


class HFWeights:
    """Lazy access to the tensors of an HF checkpoint directory: safetensors (memory-mapped) or PyTorch .bin files,
    sharded or not. Only the tensors asked for are read."""

    def __init__(self, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self.key_to_file: dict[str, Path] = {}
        files = sorted(checkpoint_dir.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith(("lit_model", "consolidated"))]
        self.format = "safetensors"
        if not files:
            files = sorted(checkpoint_dir.glob("pytorch_model*.bin"))
            self.format = "bin"
        if not files:
            raise FileNotFoundError(
                f"No Hugging Face weights (*.safetensors or pytorch_model*.bin) in {checkpoint_dir}. Download them with"
                f" `python scripts/download.py --repo_id ORG/NAME`."
            )
        self._bin_cache: dict[Path, dict] = {}
        for path in files:
            for key in self._keys(path):
                self.key_to_file[key] = path

    def _keys(self, path: Path) -> list[str]:
        try:
            if self.format == "safetensors":
                with safe_open(path, framework="pt") as f:
                    return list(f.keys())
            return list(self._load_bin(path))
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            raise ValueError(f"Could not read {path}: it is corrupt or incomplete ({e}). Download it again.") from e

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin_cache:
            self._bin_cache = {path: torch.load(path, map_location="cpu", weights_only=True, mmap=True)}
        return self._bin_cache[path]

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self.key_to_file[key]
        if self.format == "safetensors":
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key)
        return self._load_bin(path)[key]


def hf_to_lit(config: Config, weights: HFWeights, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    maps = weight_maps(config)
    missing = sorted({k for m in maps for k in m.hf if k not in weights})
    if missing:
        raise ValueError(
            f"The HF checkpoint does not match the {config.hf_architecture} config {config.name!r}: "
            f"{len(missing)} tensors are missing, e.g. {missing[:3]}"
        )
    for m in maps:
        for name, tensor in zip(m.lit, m.to_lit([weights[k] for k in m.hf])):
            yield name, tensor.to(dtype) if dtype is not None else tensor


def lit_to_hf(config: Config, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for m in weight_maps(config):
        hf.update(zip(m.hf, m.to_hf([state_dict[k] for k in m.lit])))
    return hf


def config_for_hf_checkpoint(checkpoint_dir: Path, model_name: Optional[str] = None) -> Config:
    """The named config when `model_name` (or the directory's `org/name`) is in our table, else one derived from
    the checkpoint's config.json. For LongRoPE models the rescale factors are always taken from config.json."""
    checkpoint_dir = Path(checkpoint_dir)
    hf_config_path = checkpoint_dir / "config.json"
    hf_config = json.loads(hf_config_path.read_text()) if hf_config_path.is_file() else None
    candidates = [model_name] if model_name else [f"{checkpoint_dir.parent.name}/{checkpoint_dir.name}", checkpoint_dir.name]
    for candidate in candidates:
        try:
            config = Config.from_name(candidate)
        except ValueError:
            if model_name:
                raise
            continue
        if hf_config is not None:
            differing = _config_differences(config, hf_config)
            if differing and model_name:
                raise ValueError(f"--model_name {model_name} does not match {hf_config_path} ({differing}); omit"
                                 " --model_name to take the config from config.json")
            if differing:
                print(f"{checkpoint_dir.name!r} is named like {config.name}, but {hf_config_path} differs"
                      f" ({differing}): converting with the config of config.json")
                return Config.from_hf_config(hf_config, name=checkpoint_dir.name)
        if hf_config is not None and config.hf_architecture == "Phi3ForCausalLM":
            config.rope_scaling = Config.from_hf_config(hf_config).rope_scaling
        return config
    if hf_config is None:
        raise FileNotFoundError(
            f"{hf_config_path} not found and {checkpoint_dir.name!r} is not a known model name. Download the"
            " checkpoint with `python scripts/download.py --repo_id ORG/NAME`, or pass --model_name."
        )
    return Config.from_hf_config(hf_config, name=checkpoint_dir.name)


# the config fields that decide the tensors' shapes
SHAPE_FIELDS = ("hf_architecture", "vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "head_size",
                "intermediate_size", "n_expert")


def _config_differences(config: Config, hf_config: dict) -> str:
    """The shape fields on which a table config and the checkpoint's config.json disagree ('' when none)."""
    try:
        derived = Config.from_hf_config(hf_config, name=config.name)
    except (ValueError, KeyError, TypeError):
        return ""  # config.json cannot be read as a config; the tensor shapes are still checked
    return ", ".join(f"{key} {getattr(config, key)} vs {getattr(derived, key)}" for key in SHAPE_FIELDS
                     if getattr(config, key) != getattr(derived, key))


def _checked_shapes(tensors: Iterator[tuple[str, torch.Tensor]], config: Config, checkpoint_dir: Path):
    """The converted tensors, each checked against the shape the config gives it: a config that does not describe
    these weights is one error naming the tensor, before anything is written."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    for name, tensor in tensors:
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"The weights in {checkpoint_dir} do not fit the {config.name!r} config: {name} is"
                             f" {list(tensor.shape)}, the config expects {list(expected[name])}. Check config.json"
                             " (or --model_name)")
        yield name, tensor


def convert_hf_checkpoint(
    checkpoint_dir: Path | str, model_name: Optional[str] = None, dtype: Optional[str] = None
) -> Config:
    """HF weights in `checkpoint_dir` -> `model_config.yaml` + `lit_model.safetensors` + `prompt_style.yaml` in the
    same directory (an existing prompt_style.yaml is kept: it may be the user's choice)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {checkpoint_dir} does not exist")
    for leftover in checkpoint_dir.glob(".convert-*"):  # the temporary shards of an interrupted conversion
        shutil.rmtree(leftover, ignore_errors=True)
    config = config_for_hf_checkpoint(checkpoint_dir, model_name)
    weights = HFWeights(checkpoint_dir)
    tensors = _checked_shapes(hf_to_lit(config, weights, parse_dtype(dtype)), config, checkpoint_dir)
    save_sharded(_progress(tensors, len(weight_maps(config))), checkpoint_dir)
    config.save(checkpoint_dir)
    if not has_prompt_style(checkpoint_dir):
        # the checkpoint's own chat template decides; without one, the model's name does
        style = load_prompt_style(checkpoint_dir)
        if style.name == "default":
            style = PromptStyle.from_config(config.hf_repo or config.name)
        save_prompt_style(style, checkpoint_dir)
    return config


def _progress(items: Iterator, total: int) -> Iterator:
    from tqdm import tqdm

    return tqdm(items, total=total, desc="Converting", unit="tensor", disable=total < 50)


def hf_config_dict(config: Config) -> dict:
    """The transformers `config.json` for our config (the inverse of `Config.from_hf_config`)."""
    arch = config.hf_architecture
    c = {
        "architectures": [arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.block_size,
        "rope_theta": config.rope_base,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if arch == "FalconForCausalLM":
        new_arch = config.falcon_new_decoder_architecture
        return dict(
            c, model_type="falcon", num_kv_heads=config.n_query_groups, new_decoder_architecture=new_arch,
            multi_query=config.n_query_groups == 1, parallel_attn=config.parallel_residual, bias=config.bias,
            num_ln_in_parallel_attn=1 if config.shared_attention_norm else 2, ffn_hidden_size=config.intermediate_size,
            layer_norm_epsilon=config.norm_eps, alibi=False,
        )
    if arch == "PhiForCausalLM":
        return dict(
            c, model_type="phi", num_key_value_heads=config.n_query_groups, intermediate_size=config.intermediate_size,
            partial_rotary_factor=config.rotary_percentage, layer_norm_eps=config.norm_eps, qk_layernorm=False,
            hidden_act="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        )
    c.update(
        num_key_value_heads=config.n_query_groups, head_dim=config.head_size, intermediate_size=config.intermediate_size,
        rms_norm_eps=config.norm_eps, hidden_act="silu",
    )
    scaling = config.rope_scaling
    if scaling and scaling["type"] == "llama3":
        c["rope_scaling"] = {
            "rope_type": "llama3", "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"], "original_max_position_embeddings": scaling["original_max_seq_len"],
        }
    elif scaling and scaling["type"] == "longrope":
        c["rope_scaling"] = {"rope_type": "longrope", "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
        if scaling.get("attention_factor") is not None:
            c["rope_scaling"]["attention_factor"] = scaling["attention_factor"]
        c["original_max_position_embeddings"] = scaling["original_max_seq_len"]
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
                  "Phi3ForCausalLM": "phi3"}[arch]
    c["model_type"] = model_type
    if arch != "LlamaForCausalLM":
        c["sliding_window"] = config.sliding_window
    if arch == "Phi3ForCausalLM":
        c["pad_token_id"] = None
    if arch == "MixtralForCausalLM":
        c.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token)
    return c
