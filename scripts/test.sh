#!/usr/bin/env bash
# Run the whole test suite. Integration tests need the local Slurm cluster: it is started here unless it
# already runs, and stopped again (by pid) only if this script started it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
started_slurm=0
if ! sinfo >/dev/null 2>&1; then
  bash slurm/local/start.sh
  started_slurm=1
fi
cleanup() { if [ "$started_slurm" = 1 ]; then bash slurm/local/stop.sh; fi; }
trap cleanup EXIT
# Integration tests fail (never skip) when the cluster or SmolLM2 is missing: a green run means they ran.
export LLAVA_HPC_REQUIRE_SLURM=1 LLAVA_HPC_REQUIRE_SMOLLM2=${LLAVA_HPC_REQUIRE_SMOLLM2:-1} LLAVA_HPC_REQUIRE_EVAL_DATA=1
.venv/bin/python -m pytest "$@"
