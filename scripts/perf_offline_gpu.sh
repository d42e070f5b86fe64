#!/usr/bin/env bash
# GPU performance report on a machine that has a CUDA PyTorch (with lightning, transformers, peft)
# but no package index: an air-gapped cluster node, a rented box without internet.
#
#   scripts/perf_offline_gpu.sh fetch [PYTHON_VERSION]   # where pip can download: wheels into .whl/
#   scripts/perf_offline_gpu.sh run [OUT_DIR] [ARGS...]  # on the GPU machine, from the repo root
#
# `fetch` downloads what such a machine usually lacks (diffusers, pure Python) for its Python
# version (default 3.12). `run` installs the wheels into /tmp/dreammix-site (nothing system-wide),
# runs `python -m dreammix.perf --model sdxl_arch` from src/ on the GPU and writes report.json +
# report.md into OUT_DIR (default outputs/perf-gpu). The cases are the minimum the GPU targets need
# (1024 px, batch 1, two repeats), for a time-limited lease; extra ARGS go to dreammix.perf and
# override them (e.g. --train-cases 1024x1,1024x2 --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=.whl
site=/tmp/dreammix-site

case "${1:-}" in
  fetch)
    py="${2:-3.12}"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
      --implementation cp -d "$wheels" "diffusers==0.42.1"
    ls -1 "$wheels"
    ;;
  run)
    out="${2:-outputs/perf-gpu}"
    shift $(( $# >= 2 ? 2 : 1 ))
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
      python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    fi
    export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, diffusers, lightning, transformers, peft; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__)"
    python3 -m dreammix.perf --model sdxl_arch --device cuda --train-cases 1024x1 --sample-cases 1024x1 \
      --repeats 2 --train-steps 10 --warmup 2 --sample-calls 2 --out "$out" "$@"
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
