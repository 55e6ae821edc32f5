#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs them (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-python}" -m pytest -q tests "$@"
