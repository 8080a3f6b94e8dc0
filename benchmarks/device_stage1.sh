#!/usr/bin/env bash
# The one device call for benchmarks/stage1_throughput.py on a lent H100/H200 (image: Python 3.12, torch, timm,
# transformers, pyarrow; no network). Prepare here with `make device-wheels`, then run with carry [".whl"]:
#   bash benchmarks/device_stage1.sh            (figures to $OUT/stage1_throughput.{json,log})
# Extra arguments go to the benchmark (e.g. --compile off, --zero-stage 1, --batch 1024).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
out="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 benchmarks/stage1_throughput.py --out "$out/stage1_throughput.json" "$@" 2>&1 | tee "$out/stage1_throughput.log"
