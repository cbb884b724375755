"""Convert a llama.cpp GGUF file into a Forge checkpoint directory.

    python scripts/convert_gguf_checkpoint.py --gguf_path SmolLM2-135M-Instruct.Q4_1.gguf \\
        --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Every tensor is dequantized, so the result is a plain floating-point checkpoint you can fine-tune (the
quantization error stays in the weights). The directory gets what a Hugging Face download holds (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json), so transformers loads it
too, and then our own model_config.yaml, lit_model.safetensors and prompt_style.yaml.

Only the "llama" architecture is supported: Llama 1/2/3.x, TinyLlama, Mistral 7B, SmolLM/SmolLM2, ... GGUF
does not record Mistral's sliding window, so Mistral v0.1 comes out as full attention (identical up to
4096 tokens).
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from model.cli import run_cli
from model.files import atomic_save_safetensors
from model.prompts import PromptStyle, load_prompt_style, save_prompt_style
from model.weights.convert import convert_hf_checkpoint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GGUF tensor name (without "blk.N." and ".weight"/".bias") -> Hugging Face Llama module name
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# The regex that splits text into words before byte-level BPE, for each `tokenizer.ggml.pre` we support.
# Each entry reproduces the pre-tokenizer of the model's original tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level BPE vocabulary whose `tokenizer.ggml.pre` is `pre`."""
    if pre == "smollm":
        # SmolLM/SmolLM2 (and StarCoder): every digit is its own word, then GPT-2's regex
        digits = pre_tokenizers.Digits(individual_digits=True)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama 3 looks a whole word up in the vocabulary before merging (tokenizer.json "ignore_merges": true)
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    raise ValueError(
        f"Unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: smollm, gpt-2, default, llama-bpe."
        " Download the original checkpoint instead: `python scripts/download.py --repo_id ORG/NAME`."
    )


def convert_gguf_checkpoint(
    gguf_path: Path,
    checkpoint_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    max_shard_size: int = 2 * 10**9,
) -> None:
    """Dequantize a llama.cpp GGUF file into a Forge (and Hugging Face) checkpoint directory.

    Args:
        gguf_path: The .gguf file (architecture "llama", any quantization the `gguf` package can dequantize).
        checkpoint_dir: The directory to create. It must not exist yet (or be empty); nothing is written there
            unless the whole conversion succeeds.
        dtype: The dtype of the written weights; by default float32 when every tensor in the file is F32, else
            bfloat16 (use float32 to keep the dequantized values exactly).
        max_shard_size: The largest model.safetensors file to write, in bytes; bigger models are split into
            model-0000i-of-0000n.safetensors shards listed in model.safetensors.index.json.
    """
    gguf_path, checkpoint_dir = Path(gguf_path), Path(checkpoint_dir)
    reader = open_gguf(gguf_path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    check_supported(gguf_path, metadata, tensors)
    if checkpoint_dir.exists() and (not checkpoint_dir.is_dir() or any(checkpoint_dir.iterdir())):
        raise FileExistsError(f"{checkpoint_dir} already exists and is not empty; choose another --checkpoint_dir.")
    if dtype is None:
        all_f32 = all(tensor.tensor_type == GGMLQuantizationType.F32 for tensor in reader.tensors)
        dtype = "float32" if all_f32 else "bfloat16"

    config = hf_config(metadata, tensors, dtype)
    tokenizer = build_tokenizer(metadata)

    # Build everything in a temporary directory beside the target and rename it at the end, so a failed or
    # interrupted run leaves nothing behind. The temporary path ends in the same org/name, because
    # convert_hf_checkpoint looks the directory's name up in our table of configs.
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=checkpoint_dir.parent, prefix=f".{checkpoint_dir.name}.tmp-"))
    try:
        out_dir = tmp_root / checkpoint_dir.parent.name / checkpoint_dir.name
        out_dir.mkdir(parents=True)
        write_json(out_dir / "config.json", config)
        tokenizer.save(str(out_dir / "tokenizer.json"))
        write_json(out_dir / "tokenizer_config.json", tokenizer_config(metadata))
        write_json(out_dir / "generation_config.json", generation_config(metadata))
        write_weights(reader, out_dir, config, TORCH_DTYPES[dtype], max_shard_size)

        forge_config = convert_hf_checkpoint(out_dir)
        # the chat template in the file decides; without one, the model's name does (as in convert_hf_checkpoint.py)
        style = load_prompt_style(out_dir)
        if style.name == "default":
            style = PromptStyle.from_config(forge_config.hf_repo or forge_config.name)
        save_prompt_style(style, out_dir)
        os.replace(out_dir, checkpoint_dir)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    print(f"Converted {gguf_path.name} ({config['num_hidden_layers']} layers, {dtype}) into {checkpoint_dir}")


def open_gguf(gguf_path: Path) -> GGUFReader:
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found.")
    with open(gguf_path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file: it does not start with the bytes 'GGUF'.")
    try:
        return GGUFReader(gguf_path)
    except Exception as error:  # the reader raises ValueError, struct and numpy errors on a damaged file
        raise ValueError(f"{gguf_path} is truncated or corrupt ({error}); download it again.") from error


def check_supported(gguf_path: Path, metadata: dict, tensors: dict) -> None:
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{gguf_path} has architecture {architecture!r}; only 'llama' GGUF files are supported.")
    if metadata.get("split.count", 1) > 1:
        raise ValueError(
            f"{gguf_path} is one part of a split GGUF; merge the parts first with `llama-gguf-split --merge`."
        )
    if metadata.get("llama.expert_count", 0) > 0:
        raise ValueError(f"{gguf_path} is a mixture-of-experts model; only dense llama GGUF files are supported.")
    required = ["llama.embedding_length", "llama.attention.head_count", "llama.feed_forward_length",
                "llama.block_count"]
    missing = [key for key in required if key not in metadata]
    missing += [name for name in ["token_embd.weight"] if name not in tensors]
    if missing:
        raise ValueError(f"{gguf_path} is incomplete: it lacks {', '.join(missing)}.")
    for name in tensors:
        if name != "rope_freqs.weight":
            hf_tensor_name(name)


def hf_tensor_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS and parts[1] == "weight":
        return f"{GLOBAL_TENSORS[parts[0]]}.weight"
    raise ValueError(f"Unexpected tensor {gguf_name!r} in a llama GGUF file; this variant is not supported.")


def hf_config(metadata: dict, tensors: dict, dtype: str) -> dict:
    """A transformers LlamaConfig as a dict, from the `llama.*` metadata."""
    n_embd = metadata["llama.embedding_length"]
    n_head = metadata["llama.attention.head_count"]
    head_dim = metadata.get("llama.attention.key_length", n_embd // n_head)
    rope_dim = metadata.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"rope.dimension_count={rope_dim} differs from the head size {head_dim}; that is not llama.")
    rope_theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes list the innermost dimension first
        "hidden_size": n_embd,
        "intermediate_size": metadata["llama.feed_forward_length"],
        "num_hidden_layers": metadata["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata.get("llama.context_length", 2048),
        "rms_norm_eps": float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling(metadata, tensors, rope_theta, head_dim),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{name}_token_id" in metadata:
            config[key] = metadata[f"tokenizer.ggml.{name}_token_id"]
    return config


def rope_scaling(metadata: dict, tensors: dict, rope_theta: float, head_dim: int) -> Optional[dict]:
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(metadata["llama.rope.scaling.factor"])}
    if scaling_type != "none":
        raise ValueError(f"RoPE scaling {scaling_type!r} is not supported.")
    if "rope_freqs.weight" not in tensors:
        return None
    # Llama 3.1+ files store llama3-style RoPE scaling as per-frequency factors, not as parameters. The parameters
    # are not stored, so we find the usual ones that reproduce those factors (convert_hf_to_gguf.py's formula).
    factors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type).reshape(-1)
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(factors.max())
    for old_context_len in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low_freq_factor in (1.0, 2.0, 0.5, 4.0):
            for high_freq_factor in (4.0, 8.0, 2.0, 16.0, 1.0):
                if high_freq_factor <= low_freq_factor:
                    continue
                wavelen = 2 * math.pi / inv_freq
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                expected = np.where(
                    wavelen < old_context_len / high_freq_factor,
                    1.0,
                    np.where(wavelen > old_context_len / low_freq_factor, factor, 1 / ((1 - smooth) / factor + smooth)),
                )
                if np.allclose(expected, factors, rtol=1e-4):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": old_context_len,
                    }
    raise ValueError("The file's rope_freqs do not match llama3 RoPE scaling with any usual parameters.")


def build_tokenizer(metadata: dict) -> HFTokenizer:
    """A `tokenizers` tokenizer equivalent to the vocabulary in the GGUF metadata."""
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("The GGUF file holds no tokenizer vocabulary (tokenizer.ggml.tokens).")
    token_types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    add_bos, add_eos = special_token_flags(metadata)

    if tokenizer_model == "gpt2":
        pre_tokenizer, ignore_merges = byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
        merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges", [])]
        if any(len(merge) != 2 for merge in merges):
            raise ValueError("Malformed tokenizer.ggml.merges: every merge must be two tokens separated by a space.")
        tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.ByteLevel()
    elif tokenizer_model == "llama":
        tokenizer = sentencepiece_bpe(metadata, tokens, token_types, vocab)
    else:
        raise ValueError(f"Unsupported tokenizer tokenizer.ggml.model={tokenizer_model!r}; supported: gpt2, llama.")

    # Control tokens ("<|im_start|>", "<s>") and user-defined ones are matched whole in the text, as llama.cpp does.
    special = [tokens[i] for i, kind in enumerate(token_types) if kind in (TokenType.CONTROL, TokenType.UNKNOWN)]
    user_defined = [tokens[i] for i, kind in enumerate(token_types) if kind == TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])

    if add_bos or add_eos:
        bos, eos = special_token(metadata, "bos"), special_token(metadata, "eos")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
        used = ([bos] if add_bos else []) + ([eos] if add_eos and eos != bos else [])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(token, vocab[token]) for token in used]
        )
    elif tokenizer_model == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sentencepiece_bpe(metadata: dict, tokens: list[str], token_types: list[int], vocab: dict[str, int]) -> HFTokenizer:
    """Llama/Mistral/TinyLlama sentencepiece vocabularies, as transformers' LlamaTokenizerFast (legacy) builds them:
    BPE with byte fallback, "▁" for spaces, and a "▁" before the text and after every special token (like
    sentencepiece and llama.cpp)."""
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    else:
        # sentencepiece merges the adjacent pair whose union scores highest, so rank merges by that score
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("A sentencepiece GGUF vocabulary needs tokenizer.ggml.scores or tokenizer.ggml.merges.")
        ranked = []
        for index, (token, kind) in enumerate(zip(tokens, token_types)):
            if kind != TokenType.NORMAL:
                continue
            for split in range(1, len(token)):
                left, right = token[:split], token[split:]
                if left in vocab and right in vocab:
                    ranked.append((-scores[index], index, vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_ids = [i for i, kind in enumerate(token_types) if kind == TokenType.UNKNOWN]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", unk_ids[0] if unk_ids else None)
    byte_fallback = any(kind == TokenType.BYTE for kind in token_types)
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    tokenizer = HFTokenizer(model)
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    replace_spaces = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace_spaces]) if add_space_prefix else replace_spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tokenizer


def special_token_flags(metadata: dict) -> tuple[bool, bool]:
    """(add BOS, add EOS). llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise."""
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama")
    add_bos = add_bos and "tokenizer.ggml.bos_token_id" in metadata
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False) and "tokenizer.ggml.eos_token_id" in metadata
    return bool(add_bos), bool(add_eos)


def special_token(metadata: dict, name: str) -> Optional[str]:
    token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
    return metadata["tokenizer.ggml.tokens"][token_id] if token_id is not None else None


def tokenizer_config(metadata: dict) -> dict:
    add_bos, add_eos = special_token_flags(metadata)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": special_token(metadata, "bos"),
        "eos_token": special_token(metadata, "eos"),
        "unk_token": special_token(metadata, "unknown"),
        "pad_token": special_token(metadata, "padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get("llama.context_length", 2048),
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def generation_config(metadata: dict) -> dict:
    """The ids that end generation: EOS plus the end-of-turn/end-of-message tokens of chat models (Llama 3)."""
    config = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    stop_ids = []
    for name in ("eos", "eot", "eom"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


def write_weights(reader: GGUFReader, out_dir: Path, config: dict, dtype: torch.dtype, max_shard_size: int) -> None:
    """Dequantize tensor by tensor into safetensors shards of at most `max_shard_size` bytes (one shard in RAM)."""
    tensors = [tensor for tensor in reader.tensors if tensor.name != "rope_freqs.weight"]
    element_size = torch.tensor([], dtype=dtype).element_size()
    shards: list[list] = [[]]
    shard_bytes = 0
    for tensor in tensors:
        size = int(tensor.n_elements) * element_size
        if shards[-1] and shard_bytes + size > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += size

    weight_map = {}
    progress = tqdm(total=len(tensors), desc="Dequantizing", unit="tensor")
    for index, shard in enumerate(shards):
        file_name = "model.safetensors"
        if len(shards) > 1:
            file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        state_dict = {}
        for tensor in shard:
            name = hf_tensor_name(tensor.name)
            state_dict[name] = torch.from_numpy(dequantized(tensor, config)).to(dtype)
            weight_map[name] = file_name
            progress.update()
        atomic_save_safetensors(state_dict, out_dir / file_name, metadata={"format": "pt"})
    progress.close()
    if len(shards) > 1:
        total_size = sum(int(tensor.n_elements) * element_size for tensor in tensors)
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_json(out_dir / "model.safetensors.index.json", index)


def dequantized(tensor, config: dict) -> np.ndarray:
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        message = f"Tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize ({error})."
        raise ValueError(message) from error
    # GGUF lists dimensions innermost first; numpy (and PyTorch) outermost first
    array = np.array(array, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
    # llama.cpp interleaves the rows of each query/key head for its RoPE kernel (convert_hf_to_gguf.py `permute`)
    if ".attn_q." in tensor.name:
        array = unpermute(array, config["num_attention_heads"])
    elif ".attn_k." in tensor.name:
        array = unpermute(array, config["num_key_value_heads"])
    return array


def unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's `permute(weights, n_head, n_head_kv)`: rows in (n_head, d/2, 2) order go back to
    Hugging Face's (n_head, 2, d/2), where each head's first half of rows is rotated with its second half."""
    shape = weights.shape
    return weights.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, ensure_ascii=False)
        file.write("\n")


if __name__ == "__main__":
    run_cli(convert_gguf_checkpoint)
