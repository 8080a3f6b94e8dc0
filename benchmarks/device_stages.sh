#!/usr/bin/env bash
# The one device call for benchmarks/device_stages.py on a lent H100/H200 (image: Python 3.12, torch, timm,
# transformers, pyarrow; no network): all four training stages at paper shapes under bf16 with compiled blocks,
# inference parity, offline caption embedding with a 7-B decoder, kill and resume; <= 8 minutes. Prepare here:
#   make device-wheels                                                         # DeepSpeed + small wheels into .whl/
#   .venv/bin/python -m benchmarks.device_stages --save-tokenizer .whl/tokenizer  # bert-base-uncased WordPiece files
# then run with carry [".whl"], timeout_s 560:
#   bash benchmarks/device_stages.sh        (figures to $OUT/device_stages.json, device_stages.log, gpu.txt)
# Extra arguments go to the entry point (e.g. --only stage1,resume, --compile off, --budget-s 300).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
out="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
extra=()
if [ -d .whl/tokenizer ]; then extra=(--tokenizer .whl/tokenizer); fi  # else the script trains a WordPiece vocabulary
python3 -m benchmarks.device_stages --preset gpu --out "$out/device_stages.json" --workdir /tmp/device_stages \
  ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee "$out/device_stages.log"
