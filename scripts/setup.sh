#!/usr/bin/env bash
# Installs the package and what it needs. Usage: bash scripts/setup.sh [extra,...]  (default: dev)
# torch is installed only when absent: pinned to 2.13.0 (a CPU wheel on our CPU machines, the CUDA wheel from PyPI
# elsewhere), so an existing GPU build is never replaced and no multi-GB download happens by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
