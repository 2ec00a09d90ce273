#!/usr/bin/env bash
# Test job: set up, then run the whole test suite (unit tests + a headless papermill run of the chain).
# Extra arguments go to pytest, e.g. -m "not slow" or -k pope
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q --durations=10 "$@"
