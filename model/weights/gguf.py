"""GGUF, the file format of llama.cpp and Ollama, in both directions, sharing one set of name and metadata tables.

Import (`convert_gguf_checkpoint`): a llama.cpp GGUF file -> a Forge (and Hugging Face) checkpoint directory.
Every tensor is dequantized, so the result is a plain floating-point checkpoint you can fine-tune (the
quantization error stays in the weights). Only the "llama" architecture is read: Llama 1/2/3.x, TinyLlama,
Mistral 7B, SmolLM/SmolLM2, ... GGUF does not record Mistral's sliding window, so Mistral v0.1 comes out as full
attention (identical up to 4096 tokens).

Export (`export_gguf`): a Forge model -> one GGUF file that llama.cpp runs: the tensors in llama.cpp's names and
layout (query/key rows permuted for its RoPE kernel on the "llama" architecture, fused tensors kept or split as
its loader expects), the architecture metadata, the tokenizer (byte-level BPE with its merges and pre-tokenizer
type, or sentencepiece with its scores), the special tokens and the chat template of the checkpoint's prompt
style. Tensors are converted, quantized and written one at a time, into a temporary file renamed at the end.
"""

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize
from safetensors import safe_open
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from model.config import Config
from model.files import atomic_save_safetensors, publish_file
from model.prompts import PromptStyle, detect_from_chat_template, load_prompt_style, save_prompt_style
from model.tokenizer import Tokenizer
from model.weights.checkpoint import lit_weight_files
from model.weights.convert import convert_hf_checkpoint, weight_maps

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
    factor = float(factors.max())
    # our exporter records the original context; otherwise try the usual ones
    stored = metadata.get("llama.rope.scaling.original_context_length")
    for old_context_len in ([stored] if stored else []) + [8192, 4096, 2048, 16384, 32768, 65536, 131072]:
        for low_freq_factor in (1.0, 2.0, 0.5, 4.0):
            for high_freq_factor in (4.0, 8.0, 2.0, 16.0, 1.0):
                if high_freq_factor <= low_freq_factor:
                    continue
                scaling = {"factor": factor, "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                           "original_max_seq_len": old_context_len}
                if np.allclose(llama3_rope_factors(rope_theta, head_dim, scaling), factors, rtol=1e-4):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": old_context_len,
                    }
    raise ValueError("The file's rope_freqs do not match llama3 RoPE scaling with any usual parameters.")


def llama3_rope_factors(rope_theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """The per-frequency divisors that llama.cpp reads from `rope_freqs.weight` for Llama 3.1+ RoPE scaling
    (convert_hf_to_gguf.py's formula; the same scaling as `model.gpt.rope_inv_freq`)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_seq_len"]
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))


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




# ---------------------------------------------------------------------------------------------------------------
# Export: a Forge model -> a GGUF file for llama.cpp / Ollama
# ---------------------------------------------------------------------------------------------------------------

# --outtype -> the GGUF type of the 2-D weights (what llama.cpp's convert_hf_to_gguf.py writes for f32/f16/bf16/q8_0;
# the 4/5-bit types are the ones the gguf package can quantize, which llama.cpp otherwise makes with llama-quantize)
OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

# our HF architecture -> llama.cpp's architecture (Mistral and Mixtral are "llama" there, as in convert_hf_to_gguf.py)
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MixtralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "PhiForCausalLM": gguf.MODEL_ARCH.PHI2,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
    "FalconForCausalLM": gguf.MODEL_ARCH.FALCON,
}

# Mixtral's per-expert HF tensors -> the stacked GGUF tensor of each layer
EXPERT_TENSORS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}

# Chat templates for prompt styles whose checkpoint carries none of its own (a base model fine-tuned on ChatML).
# Each renders exactly what the style's `apply` does (tests/test_convert_to_gguf.py checks it).
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' and DEFAULT_SYSTEM %}"
    "{{ '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Ollama's Go template for the same format (Ollama does not run Jinja)
CHATML_OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): each head's rows go from Hugging Face's (2, d/2) halves to
    interleaved (d/2, 2) pairs, the layout of llama.cpp's RoPE kernel for the "llama" architecture."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_tensors(config: Config, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every tensor llama.cpp loads, in file order, reading our tensors through `get` one
    weight-map entry at a time (so only one layer's tensors are in memory). Works on "meta" tensors too, which
    gives the names and shapes the file header needs before any data is converted."""
    arch = GGUF_ARCHITECTURES[config.hf_architecture]
    names = gguf.get_tensor_name_map(arch, config.n_layer)
    scaling = config.rope_scaling
    if scaling and scaling["type"] == "llama3":
        factors = llama3_rope_factors(config.rope_base, config.rope_n_elem, scaling)
        yield "rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)
    if scaling and scaling["type"] == "longrope":
        yield "rope_factors_long.weight", torch.tensor(scaling["long_factor"], dtype=torch.float32)
        yield "rope_factors_short.weight", torch.tensor(scaling["short_factor"], dtype=torch.float32)
    experts: dict[str, list[torch.Tensor]] = {}
    for entry in weight_maps(config):
        ours = [get(name) for name in entry.lit]
        if config.hf_architecture == "FalconForCausalLM" and entry.hf[0].endswith("query_key_value.weight"):
            pairs = [(entry.hf[0], ours[0])]  # llama.cpp wants [all q; all k; all v], which is our layout already
        else:
            pairs = list(zip(entry.hf, entry.to_hf(ours)))
        for hf_name, tensor in pairs:
            expert = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", hf_name)
            if expert:
                key = f"blk.{expert[1]}.{EXPERT_TENSORS[expert[3]]}.weight"
                experts.setdefault(key, []).append(tensor)
                if len(experts[key]) == config.n_expert:
                    yield key, torch.stack(experts.pop(key))
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"llama.cpp has no tensor for {hf_name} of {config.hf_architecture}")
            if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("attn_q.weight"):
                tensor = permute(tensor, config.n_head)
            elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("attn_k.weight"):
                tensor = permute(tensor, config.n_query_groups)
            yield name, tensor


def tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """As convert_hf_to_gguf.py: norms, biases, RoPE factors and the MoE router stay float32; a matrix whose rows do
    not split into whole quantization blocks falls back to float16."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return GGMLQuantizationType.F32
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return GGMLQuantizationType.F16
    return qtype


def encode_tensor(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    array = tensor.detach().to(torch.float32).cpu().numpy()
    if qtype == GGMLQuantizationType.F32:
        return array
    return quantize(array, qtype)


def tokenizer_metadata(checkpoint_dir: Path, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata for the checkpoint's tokenizer (tokenizer.json or tokenizer.model), padded with
    unused tokens to the model's embedding rows as llama.cpp requires."""
    tokenizer = Tokenizer(checkpoint_dir)
    tokenizer_json = checkpoint_dir / "tokenizer.json"
    metadata: dict[str, Any] = {}
    if (checkpoint_dir / "tokenizer.model").is_file():
        # sentencepiece's own scores, as convert_hf_to_gguf.py prefers them too
        vocab = gguf.SentencePieceVocab(checkpoint_dir)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text.decode("utf-8"))
            scores.append(score)
            types.append(kind)
        metadata["tokenizer.ggml.model"] = "llama"
        metadata["tokenizer.ggml.scores"] = scores
        metadata["tokenizer.ggml.add_space_prefix"] = True
    else:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{tokenizer_json}: {model.get('type')} tokenizers cannot be exported; only BPE ones")
        by_id = {index: token for token, index in model["vocab"].items()}
        special_added = {}
        for added in data.get("added_tokens", []):
            by_id[added["id"]] = added["content"]
            special_added[added["id"]] = added.get("special", True)
        tokens = [by_id.get(index, f"[PAD{index}]") for index in range(max(by_id) + 1)]
        merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
        types = []
        for index, token in enumerate(tokens):
            if index not in by_id:
                types.append(TokenType.UNUSED)
            elif token == model.get("unk_token"):
                types.append(TokenType.UNKNOWN)
            elif index in special_added:
                types.append(TokenType.CONTROL if special_added[index] else TokenType.USER_DEFINED)
            elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
        if model.get("byte_fallback"):
            # a sentencepiece vocabulary saved as tokenizer.json (Llama 2, Mistral, TinyLlama): llama.cpp merges the
            # adjacent pair whose union scores highest, so a token made by an earlier merge scores higher
            scores = [0.0] * len(tokens)
            index_of = {token: index for index, token in enumerate(tokens)}
            for rank, merge in enumerate(merges):
                made = index_of.get(merge.replace(" ", ""))
                if made is not None and scores[made] == 0.0:
                    scores[made] = -float(rank + 1)
            metadata["tokenizer.ggml.model"] = "llama"
            metadata["tokenizer.ggml.scores"] = scores
            metadata["tokenizer.ggml.add_space_prefix"] = "Prepend" in json.dumps(data.get("normalizer")) or (
                "Metaspace" in json.dumps(data.get("pre_tokenizer")) and '"never"' not in json.dumps(data.get("pre_tokenizer"))
            )
        else:
            metadata["tokenizer.ggml.model"] = "gpt2"
            metadata["tokenizer.ggml.pre"] = pre_tokenizer_name(tokenizer_json)
        metadata["tokenizer.ggml.merges"] = merges
    if len(tokens) > vocab_size:
        raise ValueError(f"The tokenizer in {checkpoint_dir} has {len(tokens)} tokens, more than the model's {vocab_size}")
    padding = vocab_size - len(tokens)
    tokens += [f"[PAD{index}]" for index in range(len(tokens), vocab_size)]
    types += [TokenType.UNUSED] * padding
    if "tokenizer.ggml.scores" in metadata:
        metadata["tokenizer.ggml.scores"] += [-1000.0] * padding
    metadata["tokenizer.ggml.tokens"] = tokens
    metadata["tokenizer.ggml.token_type"] = [int(kind) for kind in types]
    for name, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if token_id is not None:
            metadata[f"tokenizer.ggml.{name}_token_id"] = token_id
    unknown = [index for index, kind in enumerate(types) if kind == TokenType.UNKNOWN]
    if unknown:
        metadata["tokenizer.ggml.unknown_token_id"] = unknown[0]
    # the end-of-turn token of chat models whose EOS is another token (Llama 3's <|eot_id|>)
    end_of_turn = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    if end_of_turn:
        metadata["tokenizer.ggml.eot_token_id"] = end_of_turn[0]
    metadata["tokenizer.ggml.add_bos_token"] = bool(tokenizer.use_bos)
    metadata["tokenizer.ggml.add_eos_token"] = False
    return metadata


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a byte-level BPE tokenizer.json: the one of
    our import table (`byte_level_pre_tokenizer`) that builds the same pre-tokenizer."""
    ours = json.loads(HFTokenizer.from_file(str(tokenizer_json)).to_str()).get("pre_tokenizer")
    for name in ("smollm", "gpt-2", "llama-bpe"):
        candidate = HFTokenizer(models.BPE())
        candidate.pre_tokenizer = byte_level_pre_tokenizer(name)[0]
        if json.loads(candidate.to_str())["pre_tokenizer"] == ours:
            return name
    raise ValueError(
        f"{tokenizer_json}: its pre-tokenizer is none that llama.cpp knows through this exporter (SmolLM2's, GPT-2's"
        f" or Llama 3's): {json.dumps(ours)[:200]}"
    )


def chat_template(checkpoint_dir: Path, style: PromptStyle) -> Optional[str]:
    """The Jinja chat template for the checkpoint's prompt style: the checkpoint's own when it writes that style,
    else ours for ChatML, else None (llama.cpp then formats chats with its default)."""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        template = path.read_text(encoding="utf-8") if name.endswith(".jinja") else (
            json.loads(path.read_text(encoding="utf-8")).get("chat_template"))
        if isinstance(template, str) and detect_from_chat_template(template) == style.name:
            if style.name != "chatml" or style.default_system is None or style.default_system in template:
                return template
    if style.name == "chatml":
        return CHATML_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(style.default_system or ""))
    return None


def ollama_modelfile(gguf_file: str, style: PromptStyle) -> str:
    """An Ollama Modelfile for the exported file: the prompt format as a Go template where we have one (Ollama
    otherwise falls back to recognising the GGUF's Jinja chat template), the default system prompt and the stop
    strings of the prompt style."""
    lines = [f"FROM ./{gguf_file}"]
    if style.name == "chatml":
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
    if style.default_system:
        lines.append(f'SYSTEM """{style.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in style.stop_tokens()]
    return "\n".join(lines) + "\n"


def add_architecture_metadata(writer: GGUFWriter, config: Config) -> None:
    """The `<arch>.*` keys llama.cpp reads for the family (as convert_hf_to_gguf.py writes them)."""
    arch = GGUF_ARCHITECTURES[config.hf_architecture]
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.rope_n_elem)
    if config.norm_class_name == "RMSNorm":
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if config.head_size * config.n_head != config.n_embd:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling and config.rope_scaling["type"] == "llama3":
        # llama.cpp reads the factors from rope_freqs.weight; the original context lets an importer find the
        # parameters again (ours does)
        writer.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_seq_len"])
    if config.n_expert:
        writer.add_expert_count(config.n_expert)
        writer.add_expert_used_count(config.n_expert_per_token)
    if arch == gguf.MODEL_ARCH.PHI3:
        if config.sliding_window:
            writer.add_sliding_window(config.sliding_window)
        scaling = config.rope_scaling
        if scaling and scaling["type"] == "longrope":
            from model.gpt import longrope_attention_factor

            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_seq_len"])
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(scaling))
    if arch == gguf.MODEL_ARCH.FALCON:
        writer.add_tensor_data_layout("jploski")  # [all q; all k; all v], as convert_hf_to_gguf.py writes Falcon


def checkpoint_tensors(checkpoint_dir: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(the shape of every tensor, a function reading one tensor) of a checkpoint's lit_model*.safetensors, without
    loading the checkpoint: each tensor is read from its memory-mapped file when asked for."""
    files = {}
    shapes = {}
    for path in lit_weight_files(checkpoint_dir):
        with safe_open(path, framework="pt") as file:
            for key in file.keys():
                files[key] = path
                shapes[key] = tuple(file.get_slice(key).get_shape())

    def get(key: str) -> torch.Tensor:
        with safe_open(files[key], framework="pt") as file:
            return file.get_tensor(key)

    return shapes, get


def export_gguf(
    config: Config,
    shapes: dict[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    tokenizer_dir: Path,
    style: PromptStyle,
    output_file: Path,
    outtype: str = "f16",
    name: str = "",
) -> None:
    """Write the model whose tensors `get(name)` returns (our names; `shapes` gives their shapes) as one GGUF file.

    The file is written as `.<name>.tmp-*` beside `output_file` and renamed when complete. Tensors are converted
    and quantized one at a time (a progress bar counts them), so memory holds the model's source tensors as `get`
    keeps them plus one converted tensor.
    """
    if config.hf_architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{config.hf_architecture} cannot be exported to GGUF")
    if outtype not in OUTTYPES:
        raise ValueError(f"Unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    qtype, file_type = OUTTYPES[outtype]
    output_file = Path(output_file)
    tokenizer = tokenizer_metadata(Path(tokenizer_dir), config.vocab_size)
    template = chat_template(Path(tokenizer_dir), style)

    # the names, types and byte sizes of every tensor go into the header before the data: a pass over "meta" tensors
    missing = sorted({key for entry in weight_maps(config) for key in entry.lit} - set(shapes))
    if missing:
        raise ValueError(f"The weights do not match the {config.hf_architecture} config: {missing[:3]} are missing")
    plan = []
    for tensor_name, tensor in gguf_tensors(config, lambda key: torch.empty(shapes[key], device="meta")):
        shape = tuple(tensor.shape)
        plan.append((tensor_name, shape, tensor_type(tensor_name, shape, qtype)))

    arch = GGUF_ARCHITECTURES[config.hf_architecture]
    output_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(dir=output_file.parent, prefix=f".{output_file.name}.tmp-")
    os.close(descriptor)
    writer = GGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(name or config.name)
        add_architecture_metadata(writer, config)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in tokenizer.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, list):
                writer.add_array(key, value)
            else:
                writer.add_uint32(key, value)
        if template:
            writer.add_chat_template(template)
        for tensor_name, shape, tensor_qtype in plan:
            if tensor_qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if tensor_qtype == GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(tensor_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
            else:
                byte_shape = quant_shape_to_byte_shape(shape, tensor_qtype)
                writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                                       raw_dtype=tensor_qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        progress = tqdm(total=len(plan), desc=f"Writing {outtype}", unit="tensor")
        for (tensor_name, shape, tensor_qtype), (_, tensor) in zip(plan, gguf_tensors(config, get)):
            writer.write_tensor_data(encode_tensor(tensor, tensor_qtype))
            progress.update()
        progress.close()
        writer.close()
        publish_file(tmp_name, output_file)
    finally:
        writer.close()
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
