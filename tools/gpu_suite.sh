#!/usr/bin/env bash
# The GPU checks and benchmarks, one stage per device call (each fits the 600 s limit):
#   tools/gpu_suite.sh pipeline   # gpu-check, GPU tests, bench_pipeline       (~30+40+120 s)
#   tools/gpu_suite.sh small      # peaknet-small (the original's architecture): its GPU tests
#                                 # (compile + CUDA graphs vs the original's outputs), bare net and
#                                 # pipeline, 16x352x384 bf16 compiled reduce-overhead (~60+90 s)
#   tools/gpu_suite.sh daemon     # bench_daemon, peaknet-atto and -small, K=1,2,4 (~250 s)
#   tools/gpu_suite.sh all        # both of the above in one call (~450 s)
#   tools/gpu_suite.sh runtime    # the actor runtime: its GPU tests, then bench_daemon ingest-only and
#                                 # peaknet-atto (float32) at K = 1, 2, 4, 8 producers (~420 s)
#   tools/gpu_suite.sh final      # GPU tests + ingest-only K=1,8 + peaknet-atto float32 and uint16
#                                 # K=1,2,4,8, producers binding, the daemon connecting (~560 s)
#   tools/gpu_suite.sh runtime2   # bench_daemon peaknet-atto uint16 K = 1, 2, 4, 8 and peaknet-small
#                                 # float32 K = 1, 2, 4, 8 (~450 s)
#   tools/gpu_suite.sh train      # tools/train.py --minutes 6 --resume, then evaluate.py (~370+80 s);
#                                 # PRESET (peaknet-atto), TRAIN_MINUTES (6), TRAIN_DIR (runs/train:
#                                 # git-ignored, kept on a warm device, so the next call resumes there)
#   tools/gpu_suite.sh train_speed  # tools/bench_train.py (atto and small, compile default vs reduce-overhead),
#                                 # then a fine-tune of atto with the fastest setting (~330+250 s)
#   tools/gpu_suite.sh monitor    # bench_daemon peaknet-atto K=1, live page off/on/off/on (~300 s)
#   tools/gpu_suite.sh tests_monitor  # the GPU tests, then the monitor stage (~500 s)
#   tools/gpu_suite.sh session_a  # GPU tests, peaknet-atto float32 K=1..8 with 4-thread producers,
#                                 # ingest-only K=8, one monitor off/on pair (~560 s)
#   tools/gpu_suite.sh session_c  # fine-tune the shipped atto (5 min), GPU tests of the original
#                                 # architecture, peaknet-small bare net + pipeline (~560 s)
#   tools/gpu_suite.sh small_daemon  # bench_daemon peaknet-small float32 K=1,4,8 (~130 s)
#   tools/gpu_suite.sh session_d  # the runtime's GPU tests, then peaknet-atto end to end through the
#                                 # results sender process: uint16 K=1,4, float32 K=1,4,8 (~380 s)
#   tools/gpu_suite.sh atto_rows  # the GPU tests, then peaknet-atto end to end, float32 (4-I/O-thread
#                                 # producers) and uint16, K = 1, 2, 4, 8 (~560 s)
#   tools/gpu_suite.sh small_rows # peaknet-small end to end at batch 1 and 4, K = 1, 8; ingest-only
#                                 # float32 K = 8 at batch 4 (under py-spy when .whl/ has it) and 8 (~560 s)
#   tools/gpu_suite.sh batch1     # peaknet-small at batch 1: bare net vs pipeline, the pipeline's device
#                                 # timeline (torch.profiler), the daemon's threads under py-spy (~420 s)
#   tools/gpu_suite.sh batch1b    # after DETECT_AHEAD: GPU tests, peaknet-small batch 1 K = 1 (plain, then
#                                 # its GPU process under py-spy --native), peaknet-atto float32 K = 1, 8 (~540 s)
#   tools/gpu_suite.sh batch1c    # every GPU test (with durations), peaknet-small batch 1 K = 1, 8 and
#                                 # batch 4 K = 1 end to end (~560 s)
#   tools/gpu_suite.sh small_fixed  # batch1c again, now that peaknet-small's random weights are one fixed draw
#   tools/gpu_suite.sh receive    # the bare receiver (tools/bench_receive.py: K = 8 into 4 processes, a reused
#                                 # buffer vs a ring, to the GPU) around the daemon's ingest-only K = 8 row (~300 s)
#   tools/gpu_suite.sh receive2   # the GPU tests, then in turn: bare receiver 4 processes, ingest-only K = 8 with 4
#                                 # ingest processes, bare receiver 8 processes, ingest-only with 8 (~350 s)
#   tools/gpu_suite.sh pipeline_check  # the pipeline's GPU tests, then its H2D bandwidth test twice more (~150 s)
#   tools/gpu_suite.sh slot_wait  # ingest-only K = 8 with 4, then 8 ingest processes, with the ingest
#                                 # processes' time without a free slot (~150 s)
#   tools/gpu_suite.sh buffers    # bare receiver 8 processes, then ingest-only K = 8 with 8 ingest processes:
#                                 # bound sockets, then connecting with pipeline.buffers 8, 3, and 8 with batch 8 (~330 s)
#   tools/gpu_suite.sh idle_rule  # peaknet-small batch 4 K = 1, 8 and batch 2 K = 1, peaknet-atto float32
#                                 # K = 1, 8, ingest-only K = 8 (~400 s; was run with BUSY_BATCHES 1)
#   tools/gpu_suite.sh stream2    # bench_daemon peaknet-atto uint16 K=1,4: peaknet/1 raw, then DECTRIS
#                                 # Stream V2 bslz4, then bslz4 of Bragg frames at K=4 (~300 s); needs
#                                 # cbor2, lz4 and dectris-compression in .whl/ (a wheel, or its sdist,
#                                 # built there with the image's setuptools and compiler)
# Needs the wheels of ../shared/tools/device-wheels in .whl/ (carried). Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  ln -sfn "$PWD/daemon" /tmp/site/peaknet_daemon && ln -sfn "$PWD/producers" /tmp/site/peaknet_producers || exit 1
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
step() {  # name, limit in s, command...: output to the terminal and $OUT/name.txt
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout -k 15 "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  tail -n 40 "$OUT/$name.txt"; echo "=== $name rc=$rc"
}
gpu_tests() {  # every GPU test; the failures' tracebacks in $OUT/gpu_tests.txt
  step gpu_tests 240 python3 -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider tests/test_gpu_runtime.py \
    tests/test_gpu_pipeline.py tests/test_model_original.py
}
pipeline_steps() {
  nvidia-smi --query-gpu=name,driver_version,temperature.gpu,memory.used --format=csv
  step gpu_check 30 python3 -m peaknet_daemon.gpu_health
  step gpu_tests 150 python3 -m pytest -q -s -m gpu tests/test_gpu_pipeline.py tests/test_model_original.py
  step bench_pipeline 200 python3 tools/bench_pipeline.py --seconds 3 --json "$OUT/bench_pipeline.json"
}
daemon_steps() {
  step bench_daemon "${1:-480}" python3 tools/bench_daemon.py --models peaknet-atto,peaknet-small --producers 1,2,4 \
    --compile --compile-mode reduce-overhead --frames 2000 --seconds 3 --latency-seconds 3 --timeout 150 --log-dir "$OUT" \
    --json "$OUT/bench_daemon.json"
}
small_steps() {
  step small_tests 150 python3 -m pytest -q -s -m gpu tests/test_model_original.py
  step bench_small 240 python3 tools/bench_pipeline.py --models peaknet-small --seconds 5 --skip-naive \
    --json "$OUT/bench_small.json"
}
bench_daemon_cmd() {  # name: the command of a README row (epix10k2M frames), JSON to $OUT/name.json
  BENCH=(python3 tools/bench_daemon.py --frame-shape 16,352,384 --seconds 3 --latency-seconds 3 --timeout 120
    --log-dir "$OUT" --json "$OUT/$1.json")
}
bench_daemon_row() {  # name, limit, bench_daemon args...
  local name=$1 limit=$2; shift 2
  bench_daemon_cmd "$name"
  step "$name" "$limit" "${BENCH[@]}" "$@"
}
runtime_steps() {
  step runtime_tests 200 python3 -m pytest -q -s -m gpu tests/test_gpu_runtime.py tests/test_gpu_pipeline.py
  bench_daemon_row bench_ingest 110 --models ingest-only --producers 1,2,4,8 --frames 4000 --dtype float32
  bench_daemon_row bench_ingest_p8 60 --models ingest-only --producers 8 --frames 6000 --dtype float32 \
    --ingest-processes 8
  bench_daemon_row bench_atto_f32 200 --models peaknet-atto --producers 1,2,4,8 --frames 4000 --dtype float32 \
    --compile --compile-mode reduce-overhead
}
final_steps() {  # one call: the GPU tests and the README's runtime table (~560 s)
  gpu_tests
  bench_daemon_row bench_ingest 70 --models ingest-only --producers 1,8 --frames 6000 --dtype float32
  bench_daemon_row bench_atto_f32 160 --models peaknet-atto --producers 1,2,4,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead
  bench_daemon_row bench_atto_u16 150 --models peaknet-atto --producers 1,2,4,8 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead
}
runtime2_steps() {
  bench_daemon_row bench_atto_u16 200 --models peaknet-atto --producers 1,2,4,8 --frames 4000 --dtype uint16 \
    --compile --compile-mode reduce-overhead
  bench_daemon_row bench_small_f32 240 --models peaknet-small --producers 1,2,4,8 --frames 1600 --dtype float32 \
    --compile --compile-mode reduce-overhead
}
monitor_steps() {  # the live page's overhead: every frame a hit, the page read every second; $1 pairs
  for i in $(seq 1 "${1:-2}"); do
    for m in off on; do
      step "bench_monitor_${m}_$i" 140 python3 tools/bench_daemon.py --models peaknet-atto --producers 1 --compile \
        --compile-mode reduce-overhead --frames 3000 --seconds 3 --latency-seconds 3 --timeout 120 --hit-threshold 0 \
        $([ $m = on ] && echo --monitor) --log-dir "$OUT" --json "$OUT/bench_monitor_${m}_$i.json"
    done
  done
  python3 - "$OUT" <<'PY'
import json, sys, pathlib
rows = {p.stem: json.loads(p.read_text())[0] for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_monitor_*.json"))}
for name, r in rows.items():
    print(f"{name}: {r['fps']:.1f} frames/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
off = [r["fps"] for n, r in rows.items() if "_off_" in n]
on = [r["fps"] for n, r in rows.items() if "_on_" in n]
if off and on:
    print(f"monitor on / off: {sum(on) / len(on) / (sum(off) / len(off)):.3f} (target >= 0.98)")
PY
}
session_a_steps() {  # one call: GPU tests, the runtime's float32 rows with multi-threaded producers,
                    # ingest-only K=8, one monitor off/on pair (~560 s)
  gpu_tests
  bench_daemon_row bench_atto_f32_io4 170 --models peaknet-atto --producers 1,2,4,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row bench_ingest_io2 60 --models ingest-only --producers 8 --frames 6000 --dtype float32 \
    --producer-io-threads 2
  monitor_steps 1
}
train_steps() {  # train (resumable) for TRAIN_MINUTES (6), then score the weights on every family (~80 s;
                 # EVAL=0 skips it); TRAIN_ARGS go to train.py (e.g. --init W --schedule-minutes M --lr X)
  local preset=${PRESET:-peaknet-atto} dir=${TRAIN_DIR:-runs/train} minutes=${TRAIN_MINUTES:-6}
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  step train "$(python3 -c "print(int($minutes * 60 + 40))")" python3 tools/train.py --preset "$preset" \
    --minutes "$minutes" --resume --out "$dir/$preset.safetensors" ${TRAIN_ARGS:-}
  grep -E "^\[(val|done|train)\]" "$OUT/train.txt" | tail -n 25
  cp "$dir/$preset.safetensors" "$dir/$preset.train.json" "$OUT/"
  # The resume checkpoint comes back when small enough (atto ~41 MB; small's optimiser state is not).
  [ "$(stat -c %s "$dir/$preset.ckpt.pt" 2>/dev/null || echo 0)" -lt 100000000 ] && cp "$dir/$preset.ckpt.pt" "$OUT/"
  [ "${EVAL:-1}" = 1 ] || return 0
  step eval 130 python3 tools/evaluate.py --families lattice,heldout-jungfrau-diffuse,bragg --detector 4,352,384 \
    --frames 16 --val-frames 6 --finders "$preset,classical,om" --weights "$preset=$OUT/$preset.safetensors" \
    --json "$OUT/eval.json"
}
train_speed_steps() {  # one call: training steps per second (tools/bench_train.py) for atto and small in
                      # torch.compile's default and reduce-overhead (CUDA graph) modes, then the first
                      # part of a fine-tune of the shipped atto with the fastest atto setting (TRAIN_MINUTES,
                      # default 3; the settings it picked are printed as TRAIN_ARGS for the next calls)
  step bench_train_atto 180 python3 tools/bench_train.py --presets peaknet-atto --batches 32,128 \
    --modes default,reduce-overhead --steps 20 --json "$OUT/bench_train_atto.json"
  step bench_train_small 130 python3 tools/bench_train.py --presets peaknet-small --batches 32,64 \
    --modes reduce-overhead --steps 10 --json "$OUT/bench_train_small.json"
  local pick
  pick=$(python3 - "$OUT/bench_train_atto.json" <<'PY'
import json, math, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "error" not in r]
except (OSError, ValueError):
    rows = []
best = max(rows, key=lambda r: r["panels_per_s"]) if rows else {"mode": "default", "batch": 32}
lr = 5e-4 * math.sqrt(best["batch"] / 32)  # AdamW: the square root of the batch ratio
print(f"--compile-mode {best['mode']} --batch {best['batch']} --lr {lr:.2g}")
PY
)
  echo "TRAIN_ARGS picked: $pick"
  TRAIN_MINUTES=${TRAIN_MINUTES:-3} EVAL=0 TRAIN_ARGS="$pick ${TRAIN_ARGS:-}" train_steps
}
session_c_steps() {  # one call: the first part of a fine-tuning of the shipped atto on diffraction-like
                    # frames (TRAIN_MINUTES, default 5), then the CUDA-graph test of the original
                    # architecture (TF32 bound) and peaknet-small's bare net and pipeline (~560 s).
                    # Continue on the warm machine with: EVAL=0 TRAIN_MINUTES=8 TRAIN_ARGS=... train
  TRAIN_MINUTES=${TRAIN_MINUTES:-5} EVAL=0 train_steps
  timeout -k 10 100 python3 -m pytest -q -p no:logging -p no:cacheprovider --tb=short -m gpu \
    "tests/test_model_original.py" > "$OUT/gpu_original.txt" 2>&1
  grep -E "^E |^FAILED|passed|failed" "$OUT/gpu_original.txt" | head -n 20
  step bench_small 120 python3 tools/bench_pipeline.py --models peaknet-small --seconds 3 --skip-naive \
    --json "$OUT/bench_small.json"
}
session_d_steps() {  # one call: the runtime's GPU tests, then peaknet-atto end to end (results sender)
  step runtime_tests 120 python3 -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider tests/test_gpu_runtime.py
  bench_daemon_row bench_atto_u16 110 --models peaknet-atto --producers 1,4 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead
  bench_daemon_row bench_atto_f32_io4 130 --models peaknet-atto --producers 1,4,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
}
atto_rows_steps() {  # one call: every GPU test, then the README's peaknet-atto rows (~560 s)
  gpu_tests
  bench_daemon_row atto_f32 170 --models peaknet-atto --producers 1,2,4,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row atto_u16 170 --models peaknet-atto --producers 1,2,4,8 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead
}
small_rows_steps() {  # one call: peaknet-small's latency at batch 1 and 4, ingest-only at K = 8 (~560 s)
  bench_daemon_row small_b1 170 --models peaknet-small --producers 1,8 --frames 1500 --dtype float32 --batch 1 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row small_b4 170 --models peaknet-small --producers 1,8 --frames 1500 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  local spy=()  # py-spy as the bench's parent (it may trace its descendants): where the host time goes.
  spy_setup && spy=(/tmp/site/bin/py-spy record --subprocesses --nonblocking --rate 50 \
    --format raw -o "$OUT/ingest_only_k8.raw" --)
  step ingest_k8 100 "${spy[@]}" python3 tools/bench_daemon.py --frame-shape 16,352,384 --seconds 3 \
    --latency-seconds 3 --timeout 60 --log-dir "$OUT" --json "$OUT/ingest_k8.json" --models ingest-only \
    --producers 8 --frames 12000 --dtype float32 --ingest-mode bind
  bench_daemon_row ingest_k8_b8 70 --models ingest-only --producers 8 --frames 12000 --dtype float32 \
    --ingest-mode bind --batch 8
}
idle_rule_steps() {  # one call, run with BUSY_BATCHES 1 in daemon/ingest_process.py (partial batches only to
                    # an idle device; README: worse, reverted): peaknet-small at batch 4 and 2,
                    # peaknet-atto float32 K = 1, 8, ingest-only K = 8 (~400 s)
  bench_daemon_row small_b4_idle 170 --models peaknet-small --producers 1,8 --frames 1500 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row small_b2_idle 120 --models peaknet-small --producers 1 --frames 1500 --dtype float32 --batch 2 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row atto_f32_idle 100 --models peaknet-atto --producers 1,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row ingest_k8_idle 60 --models ingest-only --producers 8 --frames 12000 --dtype float32 \
    --ingest-mode bind
}
spy_setup() {  # py-spy from .whl/py-spy.xz (its binary xz-compressed: 2 MB instead of 2.9, for the carry limit)
  [ -f .whl/py-spy.xz ] && [ ! -x /tmp/site/bin/py-spy ] && mkdir -p /tmp/site/bin && python3 -c "import lzma, shutil
with lzma.open('.whl/py-spy.xz') as s, open('/tmp/site/bin/py-spy', 'wb') as d: shutil.copyfileobj(s, d)" \
    && chmod +x /tmp/site/bin/py-spy
  [ -x /tmp/site/bin/py-spy ]
}
batch1_steps() {  # one call: why peaknet-small at batch 1 reaches 0.78 of its bare net end to end (~420 s):
                  # bare net vs pipeline at batch 1, the pipeline's device timeline, the daemon's threads
  step small_b1_pipeline 120 python3 tools/bench_pipeline.py --models peaknet-small --batch 1 --seconds 3 \
    --skip-naive --json "$OUT/small_b1_pipeline.json"
  step small_b1_profile 120 python3 tools/profile_experiments.py --only small-bf16-compiled --backend torch \
    --set pipeline.batch_size=1 --seconds 3 --out "$OUT/profile_b1"
  head -n 30 "$OUT/profile_b1/small-bf16-compiled/summary.txt"
  rm -f "$OUT/profile_b1/small-bf16-compiled/trace.json"  # tens of MB; the summary has what it says
  local spy=()
  spy_setup && spy=(/tmp/site/bin/py-spy record --subprocesses --threads --idle --nonblocking --rate 50 \
    --format raw -o "$OUT/small_b1.raw" --)
  bench_daemon_cmd small_b1_daemon
  step small_b1_daemon 170 "${spy[@]}" "${BENCH[@]}" --models peaknet-small --producers 1 --frames 1500 \
    --dtype float32 --batch 1 --compile --compile-mode reduce-overhead --producer-io-threads 4
  [ -f "$OUT/small_b1.raw" ] && python3 tools/spy_summary.py "$OUT/small_b1.raw" --top 8 --depth 3 \
    > "$OUT/small_b1_spy.txt" && head -n 120 "$OUT/small_b1_spy.txt"
}
spy_actor() {  # name, limit in s, bench_daemon args...: the bench in the background, and its GPU process
              # (the Ray actor) under py-spy with native frames, so that waits for the GIL show as such
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s, the actor under py-spy --native)"
  bench_daemon_cmd "$name"
  timeout -k 15 "$limit" "${BENCH[@]}" "$@" > "$OUT/$name.txt" 2>&1 &
  local bench=$! pid=""
  for _ in $(seq 1 300); do pid=$(pgrep -f "^ray::PipelineActor" | head -n 1); [ -n "$pid" ] && break; sleep 0.5; done
  if [ -n "$pid" ] && spy_setup; then
    timeout -s INT "$limit" /tmp/site/bin/py-spy record --pid "$pid" --native --threads --idle --rate 20 \
      --format raw -o "$OUT/$name.raw" > "$OUT/$name.spy.log" 2>&1
  fi
  wait "$bench"; echo "=== $name rc=$? (actor ${pid:-not found})"; tail -n 4 "$OUT/$name.txt"
  [ -f "$OUT/$name.raw" ] && python3 tools/spy_summary.py "$OUT/$name.raw" --top 10 --depth 6 --min-share 0.01 \
    > "$OUT/$name.spy.txt" && head -n 150 "$OUT/$name.spy.txt"
  [ -f "$OUT/$name.raw" ] && python3 -c "import lzma, shutil, sys, os
with open(sys.argv[1], 'rb') as s, lzma.open(sys.argv[1] + '.xz', 'wb') as d: shutil.copyfileobj(s, d)
os.remove(sys.argv[1])" "$OUT/$name.raw"
}
batch1b_steps() {  # one call, after DETECT_AHEAD and fewer extraction kernels (~540 s): the GPU tests,
                   # peaknet-small batch 1 K = 1 end to end, the same with the actor under py-spy --native,
                   # peaknet-atto float32 K = 1, 8 (no regression)
  gpu_tests
  bench_daemon_row small_b1 130 --models peaknet-small --producers 1 --frames 1500 --dtype float32 --batch 1 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  spy_actor small_b1_spy 150 --models peaknet-small --producers 1 --frames 1500 --dtype float32 --batch 1 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row atto_f32 110 --models peaknet-atto --producers 1,8 --frames 3000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
}
batch1c_steps() {  # one call: every GPU test (a longer limit, with durations), then peaknet-small
                   # batch 1 K = 1, 8 and batch 4 K = 1 end to end (~560 s); also named small_fixed
  step gpu_tests 270 python3 -m pytest -q -m gpu -rfE --tb=short --durations=12 -p no:cacheprovider \
    tests/test_gpu_runtime.py tests/test_gpu_pipeline.py tests/test_model_original.py
  bench_daemon_row small_b1 170 --models peaknet-small --producers 1,8 --frames 1500 --dtype float32 --batch 1 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  bench_daemon_row small_b4 120 --models peaknet-small --producers 1 --frames 1000 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
  rm -f "$OUT"/daemon-*.log  # the file count that comes back is limited
}
receive_row() {  # name, limit, bench_receive args...: the bare receiver, epix10k2M float32 frames from 8 producers
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 tools/bench_receive.py --frame-shape 16,352,384 --dtype float32 --producers 8 \
    --frames 2000 "$@"
}
ingest_row() {  # name, limit, bench_daemon args...: the daemon's ingest-only row, the same frames and producers
  local name=$1 limit=$2; shift 2
  bench_daemon_row "$name" "$limit" --models ingest-only --producers 8 --dtype float32 "$@"
}
receive_steps() {  # the bare receiver, then the daemon's ingest-only row, then the receiver again (~300 s)
  receive_row receive_a 150 --processes 4 --dest reuse,ring --h2d --json "$OUT/receive_a.json"
  ingest_row ingest_k8 80 --frames 6000
  receive_row receive_b 150 --processes 4 --dest ring --h2d
  receive_row receive_c 150 --processes 8 --dest ring --h2d
  rm -f "$OUT"/daemon-*.log
}
receive2_steps() {  # the GPU tests, then bare receiver and daemon in turn, 4 and 8 receiving processes (~350 s)
  gpu_tests
  receive_row receive_p4 100 --dest ring --h2d --processes 4
  ingest_row ingest_p4 80 --frames 6000
  receive_row receive_p8 100 --dest ring --h2d --processes 8
  ingest_row ingest_p8 80 --frames 6000 --ingest-processes 8
  rm -f "$OUT"/daemon-*.log
}
pipeline_check_steps() {  # after a change in pipeline.py: its GPU tests, and the bandwidth test (whose
                         # ratio is the noisiest) twice more, with its figures printed
  step pipeline_tests 200 python3 -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider tests/test_gpu_pipeline.py
  for i in 1 2; do
    step "h2d_$i" 90 python3 -m pytest -q -s -m gpu -p no:cacheprovider --tb=line \
      tests/test_gpu_pipeline.py::test_gpu_noop_pipeline_reaches_pinned_h2d_bandwidth
  done
}
slot_wait_steps() {  # is the GPU process what holds ingest back? (the slot wait column, ~150 s)
  ingest_row ingest_p4 75 --frames 6000
  ingest_row ingest_p8 75 --frames 6000 --ingest-processes 8
  rm -f "$OUT"/daemon-*.log
}
buffers_steps() {  # with 8 ingest processes, do more slots in flight (or bigger batches) take the slot wait
                  # away? The bare receiver first, for the machine's own ceiling, then the daemon in its
                  # topology (bind: one socket per producer, as the bare receiver) and the bench's (~330 s)
  receive_row receive_p8 100 --dest ring --h2d --processes 8
  local row=(--frames 5000 --ingest-processes 8 --seconds 1 --latency-seconds 2)
  ingest_row ingest_p8_bind 70 "${row[@]}" --ingest-mode bind
  ingest_row ingest_p8_b8 70 "${row[@]}" --buffers 8
  ingest_row ingest_p8_b3 70 "${row[@]}" --buffers 3
  ingest_row ingest_p8_b8_batch8 70 "${row[@]}" --buffers 8 --batch 8
  rm -f "$OUT"/daemon-*.log "$OUT"/*.json  # 5 text files come back; the rows are in them
}
NT_COPY=glibc.cpu.x86_non_temporal_threshold=0x40000  # glibc's memcpy streams (skips the caches) from 256 KiB
memcopy_steps() {  # the GPU tests, then what limits the bare receiver on this machine: the socket's receive
                   # buffer (SO_RCVBUF), or the copy into the ring (streaming stores) (~450 s)
  gpu_tests
  python3 -c 'import platform; print("libc", platform.libc_ver())'
  receive_row rcv_default 60 --dest ring --h2d --processes 8
  receive_row rcv_16m 60 --dest ring --h2d --processes 8 --rcvbuf 16777216
  GLIBC_TUNABLES=$NT_COPY receive_row rcv_nt 60 --dest ring --h2d --processes 8
  receive_row rcv_4m 60 --dest ring --h2d --processes 8 --rcvbuf 4194304
  local row=(--frames 5000 --ingest-processes 8 --seconds 1 --latency-seconds 2 --ingest-mode bind)
  ingest_row ingest_default 70 "${row[@]}" --streaming-copy-bytes 0  # as it ran before the daemon streamed by default
  GLIBC_TUNABLES=$NT_COPY ingest_row ingest_nt 70 "${row[@]}"
  rm -f "$OUT"/daemon-*.log "$OUT"/*.json
}
slots_nt_steps() {  # the daemon with 8 ingest processes on bound sockets: more slots in flight, with and
                   # without streaming copies, against the bare receiver (~330 s)
  receive_row rcv_default 60 --dest ring --h2d --processes 8
  local row=(--frames 5000 --ingest-processes 8 --seconds 1 --latency-seconds 2 --ingest-mode bind)
  ingest_row ingest_b8 70 "${row[@]}" --buffers 8 --streaming-copy-bytes 0  # as it ran before the default
  GLIBC_TUNABLES=$NT_COPY ingest_row ingest_b8_nt 70 "${row[@]}" --buffers 8
  GLIBC_TUNABLES=$NT_COPY ingest_row ingest_b16_nt 70 "${row[@]}" --buffers 16
  GLIBC_TUNABLES=$NT_COPY ingest_row ingest_b8_nt_batch8 70 "${row[@]}" --buffers 8 --batch 8
  GLIBC_TUNABLES=$NT_COPY receive_row rcv_nt 60 --dest ring --h2d --processes 8
  rm -f "$OUT"/daemon-*.log "$OUT"/*.json
}
streaming_steps() {  # the GPU tests, then the daemon with its streaming copies (ingest.streaming_copy_bytes,
                    # on by default) beside the bare receiver doing the same, in a ring and in shared memory (~330 s)
  gpu_tests
  GLIBC_TUNABLES=$NT_COPY receive_row rcv_ring_nt 60 --dest ring,shm --h2d --processes 8
  local row=(--frames 5000 --ingest-processes 8 --seconds 1 --latency-seconds 2 --ingest-mode bind --buffers 8)
  ingest_row ingest_b8 70 "${row[@]}"
  ingest_row ingest_b8_batch8 70 "${row[@]}" --batch 8
  rm -f "$OUT"/daemon-*.log "$OUT"/*.json
}
small_daemon_steps() {  # peaknet-small (the original architecture) end to end, float32, K = 1, 4, 8 (~130 s)
  bench_daemon_row bench_small_f32 250 --models peaknet-small --producers 1,4,8 --frames 1500 --dtype float32 \
    --compile --compile-mode reduce-overhead --producer-io-threads 4
}
stream2_deps() {  # dectris-compression has no wheels on PyPI: build its sdist here when no wheel came
  python3 -c "import cbor2, lz4.block, dectris.compression" 2>/dev/null && return 0
  local sdist; sdist=$(ls .whl/dectris_compression-*.tar.gz 2>/dev/null | head -n 1)
  [ -n "$sdist" ] && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target /tmp/site "$sdist"
  python3 -c "import cbor2, lz4.block, dectris.compression" || {
    echo "stream2: cbor2, lz4 or dectris.compression missing: carry their wheels (or the sdist) in .whl/"; return 1; }
}
stream2_rows() {  # peaknet/1 raw, then Stream V2 bslz4: same model, dtype, frames, K = 1 and 4
  bench_daemon_row bench_s2_raw 110 --models peaknet-atto --producers 1,4 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead
  bench_daemon_row bench_s2_bslz4 110 --models peaknet-atto --producers 1,4 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead --format stream2 --compression bslz4
}
stream2_steps() {  # Stream V2 against peaknet/1, same model, dtype, frames and producers (~300 s)
  stream2_deps || return 1
  stream2_rows
  bench_daemon_row bench_s2_bslz4_bragg 75 --models peaknet-atto --producers 4 --frames 3000 --dtype uint16 \
    --compile --compile-mode reduce-overhead --format stream2 --compression bslz4 --data bragg
}
session_b_steps() {  # one call: the GPU tests that failed in session_a, their errors only; then
                    # Stream V2 bslz4 against peaknet/1, K = 1 and 4 (~120 + 220 s)
  timeout -k 10 140 python3 -m pytest -q -p no:logging -p no:cacheprovider --tb=short \
    "tests/test_gpu_pipeline.py::test_gpu_pipeline_matches_sequential" \
    "tests/test_model_original.py::test_original_compiles_and_replays_as_a_cuda_graph" > "$OUT/gpu_failed.txt" 2>&1
  grep -E "^E |^FAILED|Error|passed|failed|^tests/.*py:[0-9]+" "$OUT/gpu_failed.txt" | grep -v DEBUG | head -n 60
  stream2_deps || return 1
  stream2_rows
}
case ${1:-} in
  session_b) session_b_steps ;;
  session_c) session_c_steps ;;
  small_daemon) small_daemon_steps ;;
  session_d) session_d_steps ;;
  atto_rows) atto_rows_steps ;;
  small_rows) small_rows_steps ;;
  batch1) batch1_steps ;;
  batch1b) batch1b_steps ;;
  batch1c | small_fixed) batch1c_steps ;;  # small_fixed: the same call, run again with the fixed draw
  idle_rule) idle_rule_steps ;;
  receive) receive_steps ;;
  receive2) receive2_steps ;;
  pipeline_check) pipeline_check_steps ;;
  slot_wait) slot_wait_steps ;;
  buffers) buffers_steps ;;
  memcopy) memcopy_steps ;;
  slots_nt) slots_nt_steps ;;
  streaming) streaming_steps ;;
  runtime) runtime_steps ;;
  final) final_steps ;;
  runtime2) runtime2_steps ;;
  pipeline) pipeline_steps ;;
  small) small_steps ;;
  daemon) daemon_steps ;;
  all) pipeline_steps; daemon_steps 300 ;;  # ~20+10+40+120+250 s: one call, one machine start
  train) train_steps ;;
  train_speed) train_speed_steps ;;
  monitor) monitor_steps ;;
  tests_monitor) gpu_tests; monitor_steps ;;  # ~200 + 300 s
  session_a) session_a_steps ;;
  stream2) stream2_steps ;;
  *) echo "usage: $0 pipeline|small|daemon|all|runtime|final|runtime2|train|train_speed|monitor|tests_monitor|session_a|session_b|session_c|session_d|atto_rows|small_rows|idle_rule|receive|receive2|pipeline_check|slot_wait|buffers|memcopy|slots_nt|streaming|small_daemon|stream2" >&2; exit 2 ;;
esac
