#!/usr/bin/env bash
# All GPU checks and benchmarks in one call on the GPU machine (see README "GPU figures").
#   tools/gpu_suite.sh [pipeline] [daemon] [train]     (default: pipeline daemon)
# Needs the wheels of ../shared/tools/device-wheels in .whl/ (carried). Writes logs to $OUT.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || exit 1
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
stages=${*:-pipeline daemon}
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%H:%M:%S))"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "=== $name rc=${PIPESTATUS[0]}"; }
for stage in $stages; do
  case $stage in
    pipeline)
      nvidia-smi --query-gpu=name,driver_version,temperature.gpu,memory.used --format=csv
      step gpu_check 60 python3 -m peaknet_daemon.gpu_health
      step gpu_tests 150 python3 -m pytest -q -s -m gpu tests/test_gpu_pipeline.py
      step bench_pipeline 330 python3 tools/bench_pipeline.py --seconds 3 --json "$OUT/bench_pipeline.json" ;;
    daemon)
      step bench_daemon 560 python3 tools/bench_daemon.py --models peaknet-atto,peaknet-small --producers 1,2,4 \
        --compile --frames 2000 --seconds 3 --latency-seconds 3 --json "$OUT/bench_daemon.json" ;;
    train)
      step train 540 python3 tools/train.py --minutes 7 --out "$OUT/peaknet-atto.safetensors" ;;
  esac
done
