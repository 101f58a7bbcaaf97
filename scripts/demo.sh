#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main demo: fit a neural ODE to spiral data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
export MPLBACKEND=Agg
exec .venv/bin/python -m pydiffbridge demo "$@"
