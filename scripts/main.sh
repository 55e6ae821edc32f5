#!/usr/bin/env bash
# The README's main job: installs what it needs, pretrains MAE and AutoMAE on the embedded Fashion-MNIST subset
# (offline, CPU, ~6-7 minutes on 2 cores), then prints the checkpoint, the picture grid and probe accuracies.
# Extra arguments go to training/default_job.py (e.g. --steps 200 for a quicker look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh training  # PYTHON=python3 bash scripts/main.sh: another interpreter
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-python}" training/default_job.py "$@"
