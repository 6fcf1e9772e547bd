#!/usr/bin/env bash
# The GPU check in one call, from the repository root of a machine with a CUDA GPU:
#   bash benchmarks/gpu.sh            (on the lent GPU machine: . .device-kit/env.sh && bash ...)
# Steps, most important first, each under its own time limit within BUDGET_S (default 540 s;
# on an H100 all of them take about 10 minutes, so the last ones are then skipped):
#   bf16_b32   train/eval at bf16 batch 32, cold (empty compilation cache), + PyTorch at batch
#              32 in its fastest CUDA mode (TORCH_B32_MODES, default bf16 autocast)
#   restart    the same program again with bf16_b32's compilation cache: a restart's compile
#   f32_b4     float32 batch 4 (the authors' setting) + PyTorch float32 batch 4
#   smoke      train.py on configs/smoke.py, then eval.py --once on its checkpoints
#   scan_b32   bf16 batch 32 with model.dense_block=scan (compile time against step time)
#   rendering  rendering the inputs of a small batch in the step (config.dataset.camera) as
#              the config's dataset does, beside a small model: its compile and time per batch
#   autotune   bf16 batch 32 at XLA GPU autotune level AUTOTUNE_LEVEL (default 2: no
#              correctness checks; 0, no autotuning, compiled in 29 s but ran > 2.5 s a step)
#   bf16_b4    bf16 batch 4
#   largest    the largest bf16 batch that fits, with and without remat
# Results go to $OUT (the device tool's folder) or benchmark_results/gpu: results.json (every
# step's figures and exit status, rewritten after each step, so a cut-off run keeps what it got)
# and log.txt. A step that hangs is stopped with SIGABRT, so faulthandler prints where it was.
# ONLY="bf16_b4 largest" reruns just those steps (the rest are recorded as skipped). CONFIG,
# BIG_BATCH, SMALL_BATCH and BUDGET_S rehearse it on a CPU with a tiny model
# (tests/test_gpu_script.py does).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmark_results/gpu}
config=${CONFIG:-configs/nyu.py}
big=${BIG_BATCH:-32}
small=${SMALL_BATCH:-4}
mkdir -p "$out"
work=$(mktemp -d)
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
export PYTHONFAULTHANDLER=1 TF_CPP_MIN_LOG_LEVEL=2
# JAX and PyTorch share the GPU in the --torch steps.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
: > "$out/log.txt"

# run NAME LIMIT_S COMMAND...: one step; a JSON it writes to $work/NAME.json joins the results.
run() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( deadline - $(date +%s) ))
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
    rc=skipped
  elif (( left < 20 )); then
    echo "== $name: skipped, ${left} s of the budget left" >> "$out/log.txt"
    rc=skipped
  else
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s): $*" >> "$out/log.txt"
    start=$(date +%s)
    timeout -s ABRT -k 10 "$limit" "$@" >> "$out/log.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s" >> "$out/log.txt"
  fi
  echo "{\"exit\": \"$rc\", \"seconds\": $(( $(date +%s) - ${start:-$(date +%s)} ))}" \
    > "$work/$name.status"
  python3 - "$work" "$out/results.json" <<'PY'
import glob, json, os, sys
work, output = sys.argv[1:]
results = {}
for path in sorted(glob.glob(os.path.join(work, '*.status'))):
  name = os.path.basename(path)[:-len('.status')]
  with open(path) as f:
    results[name] = {'status': json.load(f)}
  if os.path.exists(os.path.join(work, f'{name}.json')):
    with open(os.path.join(work, f'{name}.json')) as f:
      results[name].update(json.load(f))
with open(output, 'w') as f:
  json.dump(results, f, indent=1)
PY
}

bench=(python3 -m hded_jax.benchmark --config="$config" --max_wait=0 --warmup=2)

run platform 60 python3 -c "
import json, shutil, subprocess, jax
smi = shutil.which('nvidia-smi') and subprocess.run(
    ['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
    capture_output=True, text=True).stdout.strip()
json.dump({'jax': jax.__version__, 'devices': [d.device_kind for d in jax.devices()],
           'nvidia_smi': smi}, open('$work/platform.json', 'w'))"
run bf16_b32 300 "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=10 --torch \
  --torch_modes="${TORCH_B32_MODES:-bfloat16}" --cache_dir="$work/cache" \
  --output="$work/bf16_b32.json"
run restart 60 "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=2 \
  --cache_dir="$work/cache" --output="$work/restart.json"
run f32_b4 150 "${bench[@]}" --dtype=float32 --batch_size="$small" --steps=10 --torch \
  --torch_modes=float32 --output="$work/f32_b4.json"
run smoke_train 60 python3 train.py --config=configs/smoke.py --workdir="$work/smoke" \
  --config.num_train_steps=20 --config.checkpoint_every_steps=10
run smoke_eval 45 sh -c "python3 eval.py --workdir='$work/smoke' --once --timeout_secs=5 &&
  cp '$work'/smoke/eval/metrics_*.json '$work/smoke_eval.json'"
run scan_b32 120 "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=10 \
  --config.model.dense_block=scan --output="$work/scan_b32.json"
run rendering 150 "${bench[@]}" --batch_size="$small" --steps=5 --rendering \
  --config.model.block_sizes="(1, 1, 1, 1)" --config.model.growth_rate=8 \
  --config.model.num_init_features=16 --output="$work/rendering.json"
run autotune 200 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=${AUTOTUNE_LEVEL:-2}" \
  "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=10 --output="$work/autotune.json"
run bf16_b4 120 "${bench[@]}" --dtype=bfloat16 --batch_size="$small" --steps=10 \
  --output="$work/bf16_b4.json"
run largest 200 "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=2 --largest_batch \
  --output="$work/largest.json"
echo "results in $out: $(ls "$out" | tr '\n' ' ')"
