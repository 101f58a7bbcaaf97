#!/usr/bin/env bash
# Create .venv (if missing) and install pydiffbridge with the given extras.
# torch is pinned to the CPU wheel that ships with this environment (an unpinned torch would
# pull a multi-GB CUDA build); override with TORCH_SPEC, e.g. TORCH_SPEC="torch>=2.0".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" \
    -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import pydiffbridge, torch; print('pydiffbridge', pydiffbridge.__version__, '| torch', torch.__version__)"
