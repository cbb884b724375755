#!/usr/bin/env bash
# The GPU benchmark as one prepared run, for a GPU machine without network access whose Python already has CUDA
# torch, transformers, peft, lightning, safetensors and tokenizers (the machine lent to our sessions).
#
#   bash benchmarks/gpu_run.sh download          # where the package index is reachable: ./gpu_wheels, about 46 MB
#   bash benchmarks/gpu_run.sh run [ARGS...]     # on the GPU machine, with ./gpu_wheels copied along
#   bash benchmarks/gpu_run.sh check             # there too: the tests of CUDA-only code paths, on the GPU
#
# `run` installs the wheels into a folder of their own (no index, no dependencies resolved: the list below is complete
# for that machine), prints the versions and the GPU, and runs every row of benchmarks/gpu_bench.py (ARGS are passed
# to it, e.g. `--rows forge:lora,hf:lora --time_budget 480`), litgpt in the same Python. The table goes to stdout and
# to $OUT/gpu_bench.md, each row's JSON to $OUT/gpu_bench.jsonl and the end of a failed row's stderr to
# $OUT/gpu_bench_errors.log (OUT defaults to ./out). On the CPU, `run --device cpu --layers 2 --n_embd 256
# --intermediate_size 512 --vocab 512 --seq_len 64 --batch_size 2 --warmup 1 --steps 2 --row_timeout 300` checks
# the whole path in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-gpu_wheels}
# bitsandbytes: QLoRA; liger-kernel: the HF+PEFT+Liger rows; lightning-fabric: Forge's Fabric (the machine has the
# full `lightning`, which does not provide it); litgpt and what it needs beyond the machine's packages; pytest for
# `check`
PACKAGES="bitsandbytes>=0.49 liger-kernel lightning-fabric jsonargparse docstring-parser typeshed-client litgpt==0.5.13
pytest pluggy iniconfig pygments exceptiongroup tomli"

case "${1:-}" in
download)
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
        --dest "$WHEELS" $PACKAGES
    du -sh "$WHEELS"
    ;;
run | check)
    command=$1
    shift
    # into a folder of its own on PYTHONPATH (the rows' processes inherit it), leaving the machine's packages as they are
    SITE=${SITE:-/tmp/forge_site}
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if [ "$command" = check ]; then
        # the CUDA cases of tests that have one (skipped on a machine without a GPU)
        exec "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_activations.py tests/test_loss.py -k cuda "$@"
    fi
    "$PYTHON" - <<'EOF'
from importlib import metadata
import torch
versions = []
for name in ("torch", "transformers", "peft", "lightning", "lightning-fabric", "bitsandbytes", "liger-kernel",
             "litgpt"):
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} missing")
print("; ".join(versions))
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
    mkdir -p "${OUT:-out}"
    "$PYTHON" benchmarks/gpu_bench.py --litgpt_python "$(command -v "$PYTHON")" --log_dir "${OUT:-out}" "$@" \
        | tee "${OUT:-out}/gpu_bench.md"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh download | run [gpu_bench.py arguments] | check [pytest arguments]" >&2
    exit 2
    ;;
esac
