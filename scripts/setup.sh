#!/usr/bin/env bash
# Installs the package and what it needs. Usage: [PYTHON=python3] bash scripts/setup.sh [extra,...]  (default: dev)
# torch is installed only when absent: pinned to 2.13.0 (a CPU wheel on our CPU machines, the CUDA wheel from PyPI
# elsewhere), so an existing GPU build is never replaced and no multi-GB download happens by accident.
# Every later install names the installed torch's version: each torchvision release pins one torch release, so an
# unpinned `torchvision` would replace torch. The training and dev extras get the torchvision of that torch
# (torch 2.N <-> torchvision 0.(N+15)), kept only if it imports: PyPI's Linux torchvision wheels are CUDA builds that do
# not load beside a CPU torch, and a torchvision that fails to import also breaks transformers' image processors.
# automae_hf's data path then uses its PIL/numpy fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
PYTHON="${PYTHON:-python}"  # the interpreter to install into
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
torch_full="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
torch_version="${torch_full%%+*}"
pins=("torch==${torch_version}")
IFS=. read -r torch_major torch_minor _ <<<"${torch_version}"
if [[ ",${extras}," =~ ,(training|dev), && "${torch_major}" == "2" ]]; then
    pins+=("torchvision==0.$((torch_minor + 15)).*")
fi
"$PYTHON" -m pip install -q -e ".[${extras}]" "${pins[@]}"
if [[ "${pins[*]}" == *torchvision* ]] \
        && ! "$PYTHON" -c "import torchvision.transforms.v2, torchvision.ops" 2>/dev/null; then
    "$PYTHON" -m pip uninstall -q -y torchvision
    echo "setup.sh: torchvision does not import beside torch ${torch_full} (PyPI's Linux wheels are CUDA builds; for" \
         "a CPU torch, PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); uninstalled" \
         "it, so transformers keeps working; automae_hf's data path uses its PIL/numpy fallback." >&2
fi
