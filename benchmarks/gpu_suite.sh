#!/usr/bin/env bash
# The GPU suite in one call, with no `make` and no venv needed (the device machine's python3 holds
# torch; fastssl runs from this checkout, not installed). Device tool:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
# Arguments go to `python -m benchmarks.gpu_suite` (--quick, --parts a,b, --device cpu, --out DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${GPU_PY:-python3}" -m benchmarks.gpu_suite "$@"
