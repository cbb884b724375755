"""scripts/convert_gguf_checkpoint.py and the import half of model.weights.gguf: the real SmolLM2 GGUF against transformers' own GGUF loader, tiny GGUF files
written here (sentencepiece vocabulary, grouped-query attention, several quantizations, Llama 3.1 RoPE, shards),
and the errors a user sees."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from conftest import ROOT, SMOLLM2_GGUF, smollm2_gguf_path
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize

import model.weights.gguf as converter  # the library behind scripts/convert_gguf_checkpoint.py
from model import GPT
from model.tokenizer import Tokenizer

CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_transformers(smollm2_dir):
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_gguf_path().parent, gguf_file=SMOLLM2_GGUF)
    tokenizer = Tokenizer(smollm2_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_ids) == (1, 2, 2, {2})
    assert not tokenizer.use_bos and tokenizer.vocab_size == 49152
    texts = [
        "Hello, world! How are you doing today?",
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "naïve café — 日本語のテキスト, Ελληνικά, русский",
        "emoji 🤗🚀👩‍💻 and a flag 🇫🇷",
        "a   b\t\tc\n\n\nd   \n ",
        "<|im_start|>user\nWhat's the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        CHATML_PROMPT,
    ]
    for text in texts:
        ids = tokenizer.encode(text).tolist()
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>user").tolist() == [1, 4093]

    # transformers' GGUF loader drops SmolLM2's digit splitting (pre-tokenizer "smollm"); the original tokenizer
    # makes every digit its own word, so "  1" is ["  ", "1"] rather than [" ", " ", "1"].
    digit_ids = [tokenizer.token_to_id(digit) for digit in "0123456789"]
    assert tokenizer.encode("12345").tolist() == [digit_ids[d] for d in (1, 2, 3, 4, 5)]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("in 2024,  7 cats")]
    assert pieces == ["in", " ", "2", "0", "2", "4", ",", "  ", "7", " cats"]
    # and transformers loading our folder agrees with us
    transformers_on_ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    text = "a  12 🤗"
    assert transformers_on_ours(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).tolist()


@pytest.mark.real_model
def test_smollm2_logits_match_transformers_and_forge(smollm2_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "model_config.yaml", "lit_model.safetensors", "prompt_style.yaml"):
        assert (smollm2_dir / name).is_file(), name
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path().parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
        config=transformers.AutoConfig.from_pretrained(smollm2_dir),  # saves transformers a second parse of the file
    )
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = Tokenizer(smollm2_dir).encode(CHATML_PROMPT + "The capital of France is Paris.").unsqueeze(0)
    with torch.no_grad():
        expected = reference(ids).logits
        assert (converted(ids).logits - expected).abs().max() <= 1e-4
        forge = GPT.from_checkpoint(smollm2_dir, dtype=torch.float32)
        assert (forge(ids) - expected).abs().max() <= 1e-4


@pytest.mark.real_model
def test_smollm2_greedy_answer_names_paris(smollm2_dir):
    tokenizer = Tokenizer(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt = tokenizer.encode(CHATML_PROMPT).unsqueeze(0)
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                pad_token_id=tokenizer.pad_id)
    assert "Paris" in tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ tiny GGUF files


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` (the rows of each head reordered for its RoPE kernel)."""
    head_rows = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return head_rows.swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old_context: int) -> list:
    """convert_hf_to_gguf.py's rope_freqs for Llama 3.1 RoPE scaling."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


# GGUF name, HF name pattern, storage type: a mix of what real files hold
TENSORS = [
    ("token_embd.weight", "model.embed_tokens.weight", GGMLQuantizationType.Q8_0),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", GGMLQuantizationType.F32),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", GGMLQuantizationType.Q4_0),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", GGMLQuantizationType.Q8_0),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", GGMLQuantizationType.F16),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", GGMLQuantizationType.BF16),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", GGMLQuantizationType.F32),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", GGMLQuantizationType.Q4_1),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", GGMLQuantizationType.Q8_0),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", GGMLQuantizationType.Q5_0),
    ("output_norm.weight", "model.norm.weight", GGMLQuantizationType.F32),
    ("output.weight", "lm_head.weight", GGMLQuantizationType.F16),
]


def write_tiny_llama_gguf(path, sentencepiece_model, architecture="llama"):
    """A random Llama 3.1-style model with a sentencepiece vocabulary, written the way llama.cpp's converter writes
    it. Returns the transformers model holding the weights the file really stores (after quantization)."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    theta, head_dim, rope = 500000.0, 16, dict(factor=8.0, low=1.0, high=4.0, old_context=8192)
    config = transformers.LlamaConfig(
        vocab_size=processor.vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5,
        rope_theta=theta,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    state_dict = model.state_dict()
    with torch.no_grad():
        for weight in state_dict.values():
            weight.add_(torch.randn_like(weight) * 0.05)  # norms are ones and would hide mix-ups

    writer = GGUFWriter(path, architecture)
    writer.add_uint32(f"{architecture}.block_count", 2)
    writer.add_uint32(f"{architecture}.context_length", 16384)
    writer.add_uint32(f"{architecture}.embedding_length", 64)
    writer.add_uint32(f"{architecture}.feed_forward_length", 96)
    writer.add_uint32(f"{architecture}.attention.head_count", 4)
    writer.add_uint32(f"{architecture}.attention.head_count_kv", 2)
    writer.add_float32(f"{architecture}.rope.freq_base", theta)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_uint32(f"{architecture}.rope.dimension_count", head_dim)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    pieces = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
    kinds = [
        TokenType.UNKNOWN if processor.is_unknown(i) else TokenType.CONTROL if processor.is_control(i)
        else TokenType.BYTE if processor.is_byte(i) else TokenType.NORMAL
        for i in range(processor.vocab_size())
    ]
    writer.add_token_list(pieces)
    writer.add_token_scores([processor.get_score(i) for i in range(processor.vocab_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_add_bos_token(True)
    writer.add_tensor("rope_freqs.weight", np.array(llama3_rope_factors(theta, head_dim, **rope), dtype=np.float32))

    stored = {}
    for gguf_pattern, hf_pattern, qtype in TENSORS:
        for i in range(2) if "{i}" in gguf_pattern else [None]:
            gguf_name, hf_name = gguf_pattern.format(i=i), hf_pattern.format(i=i)
            weights = state_dict[hf_name].numpy()
            # the file stores quantize(weights); every row is quantized alone, so permuting rows commutes with it
            restored = dequantize(quantize(weights, qtype), qtype).reshape(weights.shape)
            stored[hf_name] = torch.from_numpy(restored.copy())
            if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
                weights = permute(weights, 4 if ".attn_q." in gguf_name else 2)
            data = quantize(weights, qtype)
            plain = qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)  # stored as numpy dtypes
            writer.add_tensor(gguf_name, data, raw_dtype=None if plain else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(stored)
    return model


def test_tiny_sentencepiece_llama_converts_exactly(tmp_path, tiny_sentencepiece_model):
    gguf_path = tmp_path / "tiny.gguf"
    reference = write_tiny_llama_gguf(gguf_path, tiny_sentencepiece_model)
    checkpoint_dir = tmp_path / "checkpoints" / "org" / "tiny-llama"
    converter.convert_gguf_checkpoint(gguf_path, checkpoint_dir, max_shard_size=60_000)

    config = json.loads((checkpoint_dir / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"  # the default for a quantized file
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (checkpoint_dir / "model.safetensors").exists()
    assert not list(checkpoint_dir.parent.glob(".*")), "temporary files left behind"

    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    converted = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    forge = GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    with torch.no_grad():
        for weight in reference.parameters():
            weight.copy_(weight.to(torch.bfloat16))  # the converted weights are stored as bfloat16
        expected = reference(ids).logits
        assert (converted(ids).logits - expected).abs().max() <= 1e-4
        assert (forge(ids) - expected).abs().max() <= 1e-4

    # the tokenizer.json built from the GGUF vocabulary tokenizes like sentencepiece itself
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_sentencepiece_model))
    tokenizer = Tokenizer(checkpoint_dir)
    assert tokenizer.backend == "huggingface" and tokenizer.use_bos and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    texts = ["The quick brown fox", "  two leading spaces", "tabs\tand\nnewlines", "unseen: ñ 日本 🦜", "12 x", ""]
    for text in texts:
        assert tokenizer.encode(text).tolist() == [1] + processor.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    assert tokenizer.encode("<s>Paris</s>", bos=False).tolist() == [1] + processor.encode("Paris") + [2]


def smollm2_style_metadata() -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "1", "2", "3", "ab", "Ġa", "12"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["a b", "Ġ a", "1 2"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def write_gguf(path, metadata: dict, tensors: dict, architecture="llama"):
    writer = GGUFWriter(path, architecture)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, [int(v) if isinstance(v, TokenType) else v for v in value])
        else:
            writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_byte_level_pre_tokenizers():
    metadata = smollm2_style_metadata()
    smollm = converter.build_tokenizer(metadata)
    # digits are split before the byte-level regex, as in SmolLM2's original tokenizer.json
    assert smollm.encode("ab 12 a", add_special_tokens=False).tokens == ["ab", "Ġ", "1", "2", "Ġa"]
    assert smollm.encode("<|im_start|>ab", add_special_tokens=False).ids == [1, 9]
    gpt2 = converter.build_tokenizer(dict(metadata, **{"tokenizer.ggml.pre": "gpt-2"}))
    assert gpt2.encode("a 12").tokens == ["a", "Ġ", "12"]
    llama3 = converter.build_tokenizer(dict(metadata, **{"tokenizer.ggml.pre": "llama-bpe"}))
    assert llama3.pre_tokenizer.pre_tokenize_str("I'LL see 12345!!\n\n") == [
        ("I", (0, 1)), ("'LL", (1, 4)), ("Ġsee", (4, 8)), ("Ġ", (8, 9)), ("123", (9, 12)), ("45", (12, 14)),
        ("!!ĊĊ", (14, 18)),
    ]
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='qwen2'"):
        converter.build_tokenizer(dict(metadata, **{"tokenizer.ggml.pre": "qwen2"}))


# ------------------------------------------------------------------------------------------ errors


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/convert_gguf_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("problem", ["missing", "not a gguf"])
def test_bad_input_exits_with_one_clear_line(tmp_path, problem):
    gguf_path = tmp_path / "model.gguf"
    if problem == "not a gguf":
        gguf_path.write_text("<!DOCTYPE html><html>a download error page</html>")
    out = tmp_path / "out"
    result = run_script("--gguf_path", str(gguf_path), "--checkpoint_dir", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    if problem == "missing":
        assert f"error: GGUF file {gguf_path} not found" in result.stderr
    else:
        assert f"error: {gguf_path} is not a GGUF file" in result.stderr
    assert not out.exists()


def test_unsupported_or_incomplete_files_are_refused(tmp_path):
    gguf_path = tmp_path / "phi.gguf"
    tensors = {"token_embd.weight": np.ones((12, 8), np.float32)}
    write_gguf(gguf_path, smollm2_style_metadata(), tensors, architecture="phi2")
    with pytest.raises(ValueError, match="architecture 'phi2'; only 'llama'"):
        converter.convert_gguf_checkpoint(gguf_path, tmp_path / "out")

    gguf_path = tmp_path / "llama.gguf"
    write_gguf(gguf_path, smollm2_style_metadata(), tensors)
    with pytest.raises(ValueError, match="incomplete: it lacks llama.embedding_length"):
        converter.convert_gguf_checkpoint(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_failure_leaves_nothing(tmp_path, tiny_sentencepiece_model, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path, tiny_sentencepiece_model)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        converter.convert_gguf_checkpoint(gguf_path, tmp_path / "taken")

    def fail(checkpoint_dir):
        assert (checkpoint_dir / "config.json").is_file()  # the HF files were written ...
        raise KeyboardInterrupt  # ... when the user pressed Ctrl+C

    monkeypatch.setattr(converter, "convert_hf_checkpoint", fail)
    parent = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        converter.convert_gguf_checkpoint(gguf_path, parent / "org" / "tiny")
    assert list(parent.rglob("*")) == [parent / "org"]
