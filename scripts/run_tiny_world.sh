#!/usr/bin/env bash
# Main job: set up, then run the tiny-world chain headlessly (all notebooks, resuming finished stages).
# Extra arguments go to `realign run`, e.g. --redo, --stage 0, --set seed=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec realign run --config configs/tiny_world.yaml "$@"
