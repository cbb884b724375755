"""One-GPU fine-tuning speed and memory at Llama-3.1-8B shape: Forge (eager, `offload`, `selective`, `block` on half
the layers and `selective` on the rest, compiled) vs HF+PEFT (+Liger, +gradient checkpointing) vs litgpt, LoRA in bf16
and QLoRA nf4, each engine in its own process on the same batches.
Results (an H200): tutorials/performance.md.

    # all rows on one GPU, each under `--row_timeout` seconds and all under `--time_budget`:
    python benchmarks/gpu_bench.py --litgpt_python /path/to/litgpt-venv/bin/python
    # check it works first, on the CPU, at a tiny width:
    python benchmarks/gpu_bench.py --device cpu --layers 2 --n_embd 256 --intermediate_size 512 --vocab 512 \\
        --seq_len 64 --batch_size 2 --warmup 1 --steps 2

Model: the Llama-3.1-8B config with `--layers` layers, random weights built on the meta device and materialized one
layer at a time in bf16 (normal(0, 0.02), norms 1): nothing is downloaded. QLoRA: every linear of the layers in nf4
(blocksize 64, no double quantization, bf16 compute), quantized layer by layer; the embedding and head stay bf16.
LoRA: r=16, alpha 32, dropout 0 on q, k, v, o, gate, up, down, adapters in bf16 (PEFT `autocast_adapter_dtype=False`),
AdamW lr 1e-4. Data: seeded random ids, `batch_size` x `seq_len`, labels = inputs (the full-vocabulary loss).
Timing: `warmup` steps, then `steps` steps between synchronizations; tokens/s = tokens / time. Memory: the setup
peak, then the counter is reset after setup and again after the first warm-up step (train peak). MFU counts
4 N_matmul + 6 N_lora + 6 L T d FLOPs per token (causal attention counted half; a recomputed forward not counted).
An out-of-memory error is a result ("OOM"), as is a row that outlives its timeout. Host syncs/step: the
operations of the last warm-up step (forward, backward, optimizer) that make the host wait for the GPU, counted with
`torch.cuda.set_sync_debug_mode("warn")` (the loss read after each step is outside the count).
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

# the litgpt engine runs in litgpt's own environment, where Forge is not installed: import `model` from this checkout
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

# in the order they run, the most telling first, so a run cut short by `--time_budget` still answers the main questions
ROWS = (
    ("forge", "lora"), ("hf", "lora"), ("forge", "qlora"), ("hf", "qlora"), ("forge_offload", "qlora"),
    ("forge_offload", "lora"), ("hf_liger", "lora"), ("hf_liger", "qlora"), ("hf_gc", "lora"), ("hf_gc", "qlora"),
    ("forge_selective", "lora"), ("forge_selective", "qlora"), ("forge_half", "lora"), ("litgpt", "lora"),
    ("litgpt", "qlora"),
)
# Forge's --gradient_checkpointing per engine name (forge_selective_compile: selective, compiled); forge_half: block on
# the first half of the layers (--checkpoint_layers), selective on the others (--checkpoint_rest)
CHECKPOINTING = {"_offload": "offload", "_selective": "selective", "_half": "block"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_config(layers: int, vocab: int, n_embd: Optional[int], intermediate_size: Optional[int]):
    """Forge's Llama-3.1-8B config, cut to `layers` layers (and to a tiny width for a dry run)."""
    from model import Config

    config = replace(Config.from_name("Llama-3.1-8B"), n_layer=layers, vocab_size=vocab)
    if n_embd:
        config = replace(config, n_embd=n_embd, head_size=n_embd // config.n_head, intermediate_size=intermediate_size)
    return config


def init_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=True):
            param.normal_(0, 0.02) if param.ndim == 2 else param.fill_(1.0)


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    module.to_empty(device=device)
    init_(module)
    module.to(torch.bfloat16)


def build_forge(config, mode: str, device: torch.device, checkpointing: str, compile: bool,
                layers: Optional[int] = None, rest: str = "none"):
    from functools import partial

    from model import GPT
    from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
    from model.quantize import quantize_model
    from model.training.loss import head_cross_entropy, labelled_positions

    with torch.device("meta"):
        model = GPT(config)
    for part in (model.transformer.wte, model.transformer.ln_f, model.lm_head):
        materialize(part, device)
    for block in model.transformer.h:
        materialize(block, device)
        if mode == "qlora":
            quantize_model(block, "bnb.nf4", torch.bfloat16, skip=())
    model.reset_rope()
    inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, key=True, projection=True, mlp=True))
    mark_only_lora_as_trainable(model)
    model.set_gradient_checkpointing(checkpointing, layers, rest).train()
    if compile:
        model.compile_blocks()

    def loss_fn(input_ids, labels):
        # the labels on the CPU, as the training scripts keep them: the labelled positions are found without a sync
        positions, targets, _ = labelled_positions(labels, input_ids.device)
        return model(input_ids, logits_mask=positions, head_fn=partial(head_cross_entropy, targets=targets)).mean()

    return model, loss_fn


def build_hf(config, mode: str, device: torch.device, liger: bool, checkpointing: bool):
    import peft
    import transformers

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    scaling = dict(config.rope_scaling)
    hf_config = transformers.LlamaConfig(
        hidden_size=config.n_embd, intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_query_groups, vocab_size=config.vocab_size,
        head_dim=config.head_size, rms_norm_eps=config.norm_eps, max_position_embeddings=config.block_size,
        tie_word_embeddings=False, attn_implementation="sdpa",
        rope_parameters=dict(rope_type="llama3", rope_theta=config.rope_base, factor=scaling["factor"],
                             low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"],
                             original_max_position_embeddings=scaling["original_max_seq_len"]),
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(part, device)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config).to(device)
    for layer in model.model.layers:
        materialize(layer, device)
        if mode == "qlora":
            from model.quantize import quantize_model

            quantize_model(layer, "bnb.nf4", torch.bfloat16, skip=())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                                       task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    if mode == "qlora":
        import bitsandbytes as bnb

        wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(wrapped.base_layer, bnb.nn.Linear4bit), "PEFT did not wrap the 4-bit layer"
    model.train()

    def loss_fn(input_ids, labels):  # labels = inputs (on the device) in this benchmark; `labels` is the CPU copy
        return model(input_ids=input_ids, labels=input_ids).loss

    return model, loss_fn


def build_litgpt(config, mode: str, device: torch.device, seq_len: int):
    from litgpt.lora import GPT as LitGPT
    from litgpt.lora import Config as LitConfig
    from litgpt.lora import mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    lit_config = LitConfig.from_name("Llama-3.1-8B", n_layer=config.n_layer, padded_vocab_size=config.vocab_size,
                                     vocab_size=config.vocab_size, n_embd=config.n_embd, head_size=config.head_size,
                                     intermediate_size=config.intermediate_size, lora_r=16, lora_alpha=32,
                                     lora_dropout=0.0, lora_query=True, lora_key=True, lora_value=True,
                                     lora_projection=True, lora_mlp=True)
    from model.gpt import Block
    from model.quantize import quantize_model

    with torch.device("meta"):
        model = LitGPT(lit_config)
    # the random weights of the other rows, drawn in build_forge's order (litgpt loads Forge's names as they are),
    # a Block at a time in bf16 and quantized as it comes for QLoRA, as build_forge and build_hf load theirs
    for part in (model.transformer.wte, model.transformer.ln_f, model.lm_head):
        materialize(part, device)
    for i, lit_block in enumerate(model.transformer.h):
        with torch.device("meta"):
            block = Block(config, i)
        materialize(block, device)
        lit_block.to_empty(device=device).to(torch.bfloat16)
        missing, unexpected = lit_block.load_state_dict(block.state_dict(), strict=False)
        assert not unexpected and all("lora_" in key for key in missing), (missing, unexpected)
        del block
        if mode == "qlora":  # litgpt's LoRA layers hold their base layer as `linear`: quantize that
            for layer in [m for m in lit_block.modules() if hasattr(m, "lora_A")]:
                layer.linear = quantize_model(torch.nn.Sequential(layer.linear), "bnb.nf4", torch.bfloat16, skip=())[0]
    with torch.no_grad():  # LoRA A random, B = 0, as at the start of a fine-tune (drawn after every base weight)
        for name, param in model.named_parameters():
            param.normal_(0, 0.02) if name.endswith("lora_A") else param.zero_() if name.endswith("lora_B") else None
    model.cos, model.sin = model.rope_cache(device=device)  # the RoPE cache, still on the meta device
    model.max_seq_length = seq_len
    mark_only_lora_as_trainable(model)
    model.train()

    def loss_fn(input_ids, labels):
        logits = model(input_ids, lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, input_ids[..., 1:])  # labels = inputs, on the device

    return model, loss_fn


def flops_per_token(config, trainable: int, seq_len: int) -> float:
    per_layer = (config.n_embd * (config.n_head + 2 * config.n_query_groups) * config.head_size
                 + config.n_head * config.head_size * config.n_embd + 3 * config.n_embd * config.intermediate_size)
    matmul = config.n_layer * per_layer + config.vocab_size * config.n_embd
    return 4 * matmul + 6 * trainable + 6 * config.n_layer * seq_len * config.n_embd


def kernel_profile(step, cuda: bool, top: int = 25) -> list:
    """One call of `step` under the profiler: [kind, name, ms, calls] per GPU kernel (top `top` by time) and the
    total per kind (gemm, attention, triton, copy, other), to see where a row's time goes. On the CPU (a dry run),
    the same for the operators' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    kernels = [(e.key, own(e) / 1e3, e.count) for e in prof.key_averages() if own(e) > 0]

    def kind(name: str) -> str:
        lowered = name.lower()
        if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas")):
            return "gemm"
        if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
            return "attention"
        if "triton" in lowered or lowered.startswith("_"):
            return "triton"
        if "memcpy" in lowered or "memset" in lowered:
            return "copy"
        return "other"

    totals: dict = {}
    for name, ms, _ in kernels:
        totals[kind(name)] = totals.get(kind(name), 0.0) + ms
    rows = [["total", k, round(v, 2), 0] for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    rows += [[kind(n), n[:110], round(ms, 2), c] for n, ms, c in sorted(kernels, key=lambda k: -k[1])[:top]]
    return rows


def run_row(engine: str, mode: str, config, batch_size: int, seq_len: int, warmup: int, steps: int,
            device: torch.device, peak_tflops: float, profile: bool = False) -> dict:
    cuda = device.type == "cuda"
    memory = (lambda: torch.cuda.max_memory_allocated(device) / 2**30) if cuda else (lambda: float("nan"))
    torch.manual_seed(0)
    start = time.perf_counter()
    if engine.startswith("forge"):
        checkpointing = next((value for part, value in CHECKPOINTING.items() if part in engine), "none")
        half = "_half" in engine
        model, loss_fn = build_forge(config, mode, device, checkpointing, compile=engine.endswith("_compile"),
                                     layers=config.n_layer // 2 if half else None, rest="selective" if half else "none")
    elif engine.startswith("hf"):
        model, loss_fn = build_hf(config, mode, device, liger=engine == "hf_liger", checkpointing=engine == "hf_gc")
    else:
        model, loss_fn = build_litgpt(config, mode, device, seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
               for _ in range(warmup + steps)]
    cpu_batches = batches  # the labels, for the engines that read them on the CPU (Forge)
    batches = [b.pin_memory().to(device, non_blocking=True) if cuda else b for b in batches]
    setup_s, setup_peak = time.perf_counter() - start, memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, syncs = [], [], float("nan")
    for i, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
        # the last warm-up step counts the operations that make the host wait for the GPU (untimed: the warnings cost)
        count_syncs = cuda and i == warmup - 1
        with warnings.catch_warnings(record=True) if count_syncs else contextlib.nullcontext() as caught:
            if count_syncs:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            loss = loss_fn(batch, cpu_batches[i])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if count_syncs:
                torch.cuda.set_sync_debug_mode("default")
                syncs = sum("synchroniz" in str(w.message) for w in caught)
        if cuda:
            torch.cuda.synchronize()
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tokens_per_s = batch_size * seq_len * steps / sum(times)

    def step():
        loss_fn(batches[-1], cpu_batches[-1]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    kernels = kernel_profile(step, cuda) if profile else []
    n_trainable = sum(p.numel() for p in trainable)
    return {
        "engine": engine, "mode": mode, "tokens_per_s": tokens_per_s, "setup_s": setup_s, "setup_peak_gb": setup_peak,
        "train_peak_gb": memory(), "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan"),
        "mfu": tokens_per_s * flops_per_token(config, n_trainable, seq_len) / (peak_tflops * 1e12),
        "first_loss": losses[0], "last_loss": losses[-1], "trainable_params": n_trainable, "syncs_per_step": syncs,
        "kernels": kernels,
    }


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """The measured dense bf16 matmul rate (random operands, after warm-up): the ceiling MFU is also read against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    rate = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def main(
    engine: Optional[str] = None, mode: str = "lora", rows: Optional[str] = None, layers: int = 32,
    vocab: int = 128256, n_embd: Optional[int] = None, intermediate_size: Optional[int] = None,
    batch_size: int = 4, seq_len: int = 2048, warmup: int = 3, steps: int = 8, device: str = "cuda",
    peak_tflops: float = 989.0, row_timeout: int = 150, time_budget: Optional[float] = None,
    litgpt_python: Optional[str] = None, log_dir: Optional[Path] = None, profile: Optional[str] = None,
) -> None:
    """Run every row (the default), or one `engine` + `mode` row in this process (printing one JSON line).

    Args:
        engine: forge, forge_offload, forge_selective (--gradient_checkpointing), forge_half (block on the first
            half of the layers, selective on the others), forge_compile, forge_offload_compile,
            forge_selective_compile, forge_half_compile, hf, hf_liger, hf_gc (gradient checkpointing) or litgpt: run
            only this row.
        mode: lora (bf16 base) or qlora (nf4 base).
        rows: comma-separated engine:mode rows to run (default: all, litgpt only with `litgpt_python`).
        layers, vocab, n_embd, intermediate_size: the model's shape (default: Llama-3.1-8B in full).
        batch_size, seq_len: the micro-batch.
        warmup, steps: untimed and timed optimizer steps.
        device: cuda or cpu (a dry run).
        peak_tflops: the device's dense bf16 peak for MFU (989: H100/H200 SXM).
        row_timeout: seconds each row may take; a row over it is reported as such.
        time_budget: seconds for all rows together; a row gets at most what is left, and rows that would start with
            under 20 s left are reported as not run (so a lease-bound run ends with its table, not killed mid-way).
        litgpt_python: the Python of a virtual environment with litgpt (and the same torch) for the litgpt rows.
        log_dir: where to write each row's JSON line (gpu_bench.jsonl) and the last lines of a failed row's stderr
            (gpu_bench_errors.log).
        profile: comma-separated engine:mode rows (or "all") that also profile one extra step after the timed ones
            and write their GPU kernel times to gpu_bench_profile.txt in `log_dir` (with `engine`: any value).
    """
    config = shape_config(layers, vocab, n_embd, intermediate_size)
    if engine is not None:
        try:
            result = run_row(engine, mode, config, batch_size, seq_len, warmup, steps, torch.device(device), peak_tflops,
                             profile=profile is not None)
        except torch.OutOfMemoryError:
            result = {"engine": engine, "mode": mode, "error": "OOM"}
        print(json.dumps(result))
        return
    began = time.perf_counter()
    selected = [tuple(r.split(":")) for r in rows.split(",")] if rows else [
        r for r in ROWS if r[0] != "litgpt" or litgpt_python]
    known = {e for e, _ in ROWS} | {f"{e}_compile" for e, _ in ROWS if e.startswith("forge")}
    for row in selected + ([] if profile in (None, "all") else [tuple(r.split(":")) for r in profile.split(",")]):
        if len(row) != 2 or row[0] not in known or row[1] not in ("lora", "qlora"):
            raise SystemExit(f"Unknown row {':'.join(row)!r}: rows are ENGINE:MODE with ENGINE one of "
                             f"{', '.join(sorted(known))} and MODE lora or qlora")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    ceiling = ""
    if device == "cuda":
        measured = matmul_tflops(torch.device(device))
        ceiling = f", measured bf16 matmul {measured:.0f} TFLOP/s (MFU below is against {peak_tflops:.0f})"
    print(f"Llama-3.1-8B shape, {layers} layers, vocab {vocab}, {batch_size} x {seq_len} tokens, {warmup} + {steps} steps,"
          f" device {torch.cuda.get_device_name() if device == 'cuda' else device}{ceiling}")
    print("| engine | mode | tokens/s | setup peak (GB) | train peak (GB) | reserved (GB) | MFU | loss first -> last |"
          " host syncs/step | row s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row_engine, row_mode in selected:
        python = litgpt_python if row_engine == "litgpt" else sys.executable
        args = [python, __file__, "--engine", row_engine, "--mode", row_mode, "--layers", str(layers), "--vocab", str(vocab),
                "--batch_size", str(batch_size), "--seq_len", str(seq_len), "--warmup", str(warmup), "--steps", str(steps),
                "--device", device, "--peak_tflops", str(peak_tflops)]
        if n_embd:
            args += ["--n_embd", str(n_embd), "--intermediate_size", str(intermediate_size)]
        if profile is not None and (profile == "all" or f"{row_engine}:{row_mode}" in profile.split(",")):
            args += ["--profile", "yes"]
        timeout = row_timeout
        if time_budget is not None:
            timeout = min(timeout, time_budget - (time.perf_counter() - began))
        row_start, stderr = time.perf_counter(), ""
        if timeout < 20:
            result = {"error": "not run (time budget spent)"}
        else:
            try:
                out = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                     env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
                lines, stderr = out.stdout.strip().splitlines(), out.stderr
                result = json.loads(lines[-1]) if out.returncode == 0 and lines else {
                    "error": (stderr.strip().splitlines() or ["failed"])[-1][:120]}
            except subprocess.TimeoutExpired as timed_out:
                result = {"error": f"over {timeout:.0f} s"}
                stderr = timed_out.stderr or ""
                stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        seconds = time.perf_counter() - row_start
        if log_dir is not None:
            with open(log_dir / "gpu_bench.jsonl", "a") as f:
                f.write(json.dumps({"engine": row_engine, "mode": row_mode, "row_s": seconds,
                                    **{k: v for k, v in result.items() if k != "kernels"}}) + "\n")
            if result.get("kernels"):
                with open(log_dir / "gpu_bench_profile.txt", "a") as f:
                    f.write(f"== {row_engine}:{row_mode} (ms in one step, calls)\n")
                    f.writelines(f"{kind:9} {ms:9.2f} {calls:6} {name}\n" for kind, name, ms, calls in result["kernels"])
            if "error" in result and stderr:
                with open(log_dir / "gpu_bench_errors.log", "a") as f:
                    f.write(f"== {row_engine}:{row_mode}\n" + "\n".join(stderr.strip().splitlines()[-40:]) + "\n")
        if "error" in result:
            print(f"| {row_engine} | {row_mode} | {result['error']} | | | | | | | {seconds:.0f} |", flush=True)
            continue
        r = result
        print(f"| {row_engine} | {row_mode} | {r['tokens_per_s']:.0f} | {r['setup_peak_gb']:.2f} | {r['train_peak_gb']:.2f} |"
              f" {r['reserved_gb']:.2f} | {r['mfu']:.1%} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
              f" {r['syncs_per_step']:.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
