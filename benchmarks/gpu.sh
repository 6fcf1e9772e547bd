#!/usr/bin/env bash
# The GPU check in one call, from the repository root of a machine with a CUDA GPU:
#   bash benchmarks/gpu.sh            (on the lent GPU machine: . .device-kit/env.sh && bash ...)
# By default it runs, in this order, within BUDGET_S (default 900 s), first the check (the
# benchmark matrix, train.py and eval.py; it should take 8 minutes on an H100):
#   platform   JAX's devices, nvidia-smi's card, driver and memory
#   bf16_b32   train/eval at bf16 batch 32, cold (empty compilation cache); XLA's autotuning log
#              (every candidate algorithm of every convolution and GEMM) kept
#   f32_b4     float32 batch 4 (the authors' setting) at XLA's default precision, TF32 on these
#              GPUs (the JSON's jax.products_in), cold
#   smoke_train, smoke_eval  train.py on configs/smoke.py, then eval.py --once on its
#              checkpoints (the lent machine's TensorFlow stand-in cannot build a dataset:
#              carry a prepared one and point TFDS_DATA_DIR at it)
#   bf16_b4    bf16 batch 4, cold
#   largest    the largest bf16 batch that fits, with and without remat (batch 32 read from
#              bf16_b32's compilation cache; two sizing compiles, then up to four steps
#              from the extrapolated batch on for each, all compiled without autotuning, the
#              two configs' programs side by side)
# then the comparisons with PyTorch, each JAX and PyTorch in one process on the card:
#   torch_b32  bf16_b32's programs (read from its cache when it ran before in the same call,
#              else compiled) + PyTorch at batch 32 in its fastest CUDA mode (TORCH_B32_MODES,
#              default bf16 autocast)
#   torch_f32  f32_b4's programs (the same) + PyTorch float32 batch 4 with TF32 on
#              (TORCH_F32_MODES, default tf32: like for like, and PyTorch's own default for
#              convolutions)
#   f32_full_b4  float32 batch 4 with model.matmul_precision=float32 (full float32 products,
#              as the CPU computes), cold, + PyTorch float32 with TF32 off, the authors'
#              setting: like for like
# What the budget cuts is recorded as skipped; the log's last lines give the check's seconds.
# ONLY="STEP ..." runs those steps instead, in that order: any of the above, and experiments
# that the default leaves out (each is a question about the compile or the step):
#   restart    bf16_b32's program again on its compilation cache (a restart: seconds from
#              process start to the first step) and a profile of three train steps (time per
#              kernel; trace and compiled HLO kept)
#   train_restart  train.py with the full model (bf16, 256x256, batch 8 of the smoke dataset)
#              for 2 steps, then resumed for a 3rd: seconds from each process's start to its
#              first step, part by part (a cold start; a restart in the same workdir, which
#              loads the step from the program cache instead of tracing it)
#   max_solutions  bf16 batch 32, cold, with XLA's autotuner trying at most MAX_SOLUTIONS
#              (default 1) cuBLAS algorithms per GEMM (--xla_gpu_autotune_max_solutions bounds
#              GEMMs, not convolutions; on the H200 the GEMMs had ~8 candidates each, the
#              convolutions ~60): how much of the autotuner's 37-39 s the GEMMs take, and what
#              the step loses; bf16_b32 is its baseline
#   flat_b32   bf16 batch 32, cold, with Adam over one vector of all the parameters
#              (optimizer.flatten: 37% fewer ops in the step, for XLA's fusion passes, 13.5 s
#              of the H200's compile; compiled for an H100 on a CPU, 2,175 kernels launched
#              per step instead of 2,701; on the CPU the same compile and step time): compile
#              time and step time against bf16_b32's
#   graphs_b32  bf16 batch 32, cold, with XLA's command buffers (CUDA graphs, each launched as
#              one) also recording the cuDNN convolutions, which XLA's default set leaves out
#              (--xla_gpu_enable_command_buffer=+CONVOLUTION): compiled for an H100 on a CPU,
#              the train step is then one command buffer instead of 581 submissions (222
#              command buffers, the 305 convolutions between them and 54 others; the H200
#              idled 17% of a step between kernels): step time against bf16_b32's
#   pipeline   the input pipeline alone at batch BIG_BATCH (NYU-sized frames): one thread per
#              core (the default), and PIPELINE_WORKERS (default 4 and 8) worker processes of 2
#              threads each, in the first epoch and after it (examples kept in memory); with
#              16 threads, before examples were kept, the H200 host gave 570 examples/s, fewer
#              than the bf16 step trains
#   profiled_b32  bf16 batch 32, cold, under the compile profiler: time per XLA compiler pass
#              and phase (the profiler adds ~25 s; so do the next three)
#   transpose_b32  the same with each up-convolution as one conv_transpose
#              (model.up_conv=transpose; 'auto' builds the phase convolutions on GPUs)
#   strided_b32  the same with the conv_transpose's kernel gradients written as the stride-2
#              convolution's it is the adjoint of (model.up_conv=transpose_strided_grads)
#   autotune   the same at XLA GPU autotune level AUTOTUNE_LEVEL (default 2: no correctness
#              checks; on the H200 XLA's compile 66.0 -> 65.3 s, the step 2% slower; 0, no
#              autotuning: on an H100 with older code, compiled in 29 s but ran > 2.5 s a step)
#   channels_b32  bf16 batch 32, cold, with model.up_conv=phase_channels: each up-convolution's
#              four phases as one convolution's output channels; compiled for an H100 on a CPU
#              it holds 1.8 GiB less than the phases, and the same 54 distinct cuDNN
#              convolutions for the autotuner (XLA merges the phases'): step time and memory
#   overrides_b32  bf16 batch 32, cold, with the config overrides in B32_OVERRIDES (e.g.
#              "--config.model.up_conv=phase_channels --config.optimizer.flatten=True": the two
#              above together), for a question no step names yet
#   scan_b32   bf16 batch 32 with model.dense_block=scan: compiled for an H100 on a CPU, 21
#              distinct cuBLAS GEMMs for the autotuner instead of 183 (each dense layer's 1x1
#              convolution reads all of its block's channels) and 33% more memory: compile
#              time against step time
#   rendering  rendering the inputs of a small batch in the step (config.dataset.camera) as
#              the config's dataset does, beside a small model: its compile and time per batch
# Results go to $OUT (the device tool's folder) or benchmark_results/gpu: results.json (every
# step's figures and exit status, rewritten after each step, so a cut-off run keeps what it got)
# and log.txt (the commands and their output); stdout says as each step starts and ends. A
# step that hangs is stopped with SIGABRT, so faulthandler prints where it was.
# CONFIG, BIG_BATCH, SMALL_BATCH and BUDGET_S rehearse it on a CPU with a tiny model
# (tests/test_gpu_script.py does).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmark_results/gpu}
config=${CONFIG:-configs/nyu.py}
big=${BIG_BATCH:-32}
small=${SMALL_BATCH:-4}
check="platform bf16_b32 f32_b4 smoke_train smoke_eval bf16_b4 largest"
steps=${ONLY:-$check torch_b32 torch_f32 f32_full_b4}

# run NAME LIMIT_S COMMAND...: one step; a JSON it writes to $work/NAME.json joins the results.
run() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( deadline - $(date +%s) ))
  # Progress on stdout, a line as each step starts and ends; the commands and output in the log.
  if (( left < 20 )); then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$out/log.txt"
    rc=skipped
  else
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s) ..."
    echo "== $name (limit ${limit} s): $*" >> "$out/log.txt"
    start=$(date +%s)
    timeout -s ABRT -k 10 "$limit" "$@" >> "$out/log.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s;" \
      "$(( deadline - $(date +%s) )) s of the budget left" | tee -a "$out/log.txt"
  fi
  echo "{\"exit\": \"$rc\", \"seconds\": $(( $(date +%s) - ${start:-$(date +%s)} ))}" \
    > "$work/$name.status"
  python3 - "$work" "$out/results.json" <<'PY'
import glob, json, os, sys
from hded_jax import files
work, output = sys.argv[1:]
results = {}
for path in sorted(glob.glob(os.path.join(work, '*.status'))):
  name = os.path.basename(path)[:-len('.status')]
  with open(path) as f:
    results[name] = {'status': json.load(f)}
  if os.path.exists(os.path.join(work, f'{name}.json')):
    try:
      with open(os.path.join(work, f'{name}.json')) as f:
        results[name].update(json.load(f))
    except ValueError as error:  # Cut off by its time limit as it wrote.
      results[name]['unreadable_output'] = str(error)
with files.atomic_write(output) as f:  # The device tool may stop this script at any moment.
  json.dump(results, f, indent=1)
PY
}

# XLA's autotuning log of a cold compile, moved to $out after its step. XLA flags are part of
# the compilation cache's key, so every step on a cache sets the same ones (and, on a cache
# hit, has nothing to log).
autotune_log() { echo "${XLA_FLAGS:-} --xla_gpu_dump_autotune_logs_to=$work/autotune_log.txt"; }
compile_profile() { echo "--compile_profile_dir=$work/compile_profile_$1"; }
# cached NAME LIMIT_S PROGRAMS [ARG...]: a benchmark step on the compilation cache of PROGRAMS
# (b32: bf16 batch 32, f32: float32 batch 4), which later steps of the same call read back.
cached() {
  local name=$1 limit=$2 programs=$3
  shift 3
  case $programs in
    b32) set -- --dtype=bfloat16 --batch_size="$big" "$@" ;;
    f32) set -- --dtype=float32 --batch_size="$small" "$@" ;;
  esac
  run "$name" "$limit" env XLA_FLAGS="$(autotune_log)" "${bench[@]}" \
    --cache_dir="$work/cache_$programs" "$@" --output="$work/$name.json"
  mv -f "$work/autotune_log.txt" "$out/autotune_log_$name.txt" 2>/dev/null
}

step_platform() {
  run platform 60 python3 -c "
import json, shutil, subprocess, jax
smi = shutil.which('nvidia-smi') and subprocess.run(
    ['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
    capture_output=True, text=True).stdout.strip()
json.dump({'jax': jax.__version__, 'devices': [d.device_kind for d in jax.devices()],
           'nvidia_smi': smi}, open('$work/platform.json', 'w'))"
}
step_bf16_b32() { cached bf16_b32 180 b32 --steps=10; }
step_f32_b4() { cached f32_b4 120 f32 --steps=10; }
step_torch_b32() {
  cached torch_b32 240 b32 --steps=10 --torch --torch_modes="${TORCH_B32_MODES:-bfloat16}"
}
step_torch_f32() {
  cached torch_f32 180 f32 --steps=10 --torch --torch_modes="${TORCH_F32_MODES:-tf32}"
}
step_f32_full_b4() {
  run f32_full_b4 150 "${bench[@]}" --dtype=float32 --batch_size="$small" --steps=10 \
    --config.model.matmul_precision=float32 --torch --torch_modes=float32 \
    --output="$work/f32_full_b4.json"
}
step_bf16_b4() {
  run bf16_b4 120 "${bench[@]}" --dtype=bfloat16 --batch_size="$small" --steps=10 \
    --output="$work/bf16_b4.json"
}
step_smoke_train() {
  run smoke_train 60 python3 train.py --config=configs/smoke.py --workdir="$work/smoke" \
    --config.num_train_steps=20 --config.checkpoint_every_steps=10
}
step_smoke_eval() {
  run smoke_eval 45 sh -c "python3 eval.py --workdir='$work/smoke' --once --timeout_secs=5 &&
    cp '$work'/smoke/eval/metrics_*.json '$work/smoke_eval.json'"
}
step_largest() { cached largest 300 b32 --steps=2 --largest_batch; }
step_restart() {
  cached restart 150 b32 --steps=10 --profile_dir="$work/profile"
  # The trace and the compiled program come back where they are small enough.
  find "$work/profile" \( -name perfetto_trace.json.gz -o -name '*.hlo.txt.gz' \) -size -40M \
    -exec cp {} "$out" \; 2>/dev/null
}
step_train_restart() {
  # RESTART_MODEL: the model and batch (the rehearsal on a CPU makes them small).
  local restart_train=(python3 train.py --config=configs/smoke.py --workdir="$work/restart"
    ${RESTART_MODEL:---config.model.block_sizes=(6,12,24,16) --config.model.growth_rate=32
    --config.model.num_init_features=64 --config.model.dtype=bfloat16
    --config.dataset.image_size=(256,256) --config.batch_size=8}
    --config.checkpoint_every_steps=100)
  run train_restart 240 sh -c '
    "$@" --config.num_train_steps=2 > "$0/restart_cold.log" 2>&1 &&
    "$@" --config.num_train_steps=3 > "$0/restart_resumed.log" 2>&1
    status=$?
    cat "$0/restart_cold.log" "$0/restart_resumed.log"
    python3 - "$0" <<"PY"
import json, re, sys
work = sys.argv[1]
def first_step(log):
  # "Step N done T s after the process started: PART S s, PART S s, ...; WHAT in S s beside
  # them." (WHAT: XLA compiling the step or loading it from the program cache)
  found = re.findall(r"Step \d+ done ([0-9.]+) s after the process started: ([^;]*); "
                     r"(.*) in ([0-9.]+) s beside them", open(f"{work}/{log}").read())
  if not found:
    return None, None, None
  total, parts, beside, beside_s = found[0]
  parts = re.findall(r"([a-zA-Z ,()-]+?) ([0-9.]+) s(?:, |$)", parts)
  return float(total), {what: float(s) for what, s in parts}, {beside: float(beside_s)}
results = {}
for run, log in (("cold", "restart_cold.log"), ("restart", "restart_resumed.log")):
  (results[f"{run}_first_step_s"], results[f"{run}_parts_s"],
   results[f"{run}_beside_s"]) = first_step(log)
json.dump(results, open(f"{work}/train_restart.json", "w"))
PY
    exit $status' "$work" "${restart_train[@]}"
}
# cold_b32 NAME LIMIT_S [OVERRIDE...]: bf16 batch 32, cold (no compilation cache).
cold_b32() {
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "${bench[@]}" --dtype=bfloat16 --batch_size="$big" --steps=10 "$@" \
    --output="$work/$name.json"
}
step_max_solutions() {
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_max_solutions=${MAX_SOLUTIONS:-1}" \
    cold_b32 max_solutions 150
}
step_flat_b32() { cold_b32 flat_b32 150 --config.optimizer.flatten=True; }
step_graphs_b32() {
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+CONVOLUTION" cold_b32 graphs_b32 150
}
step_pipeline() {
  run pipeline 120 sh -c '
    workers_list=$1
    shift
    for workers in 0 $workers_list; do
      threads=$(( workers ? 2 : 0 ))
      "$@" --pipeline_only --config.dataset.num_workers=$workers \
        --config.dataset.num_threads=$threads --output="$0/pipeline_$workers.json" || exit
    done
    python3 - "$0" $workers_list <<"PY"
import json, sys
work, workers = sys.argv[1], [0, *sys.argv[2:]]
json.dump({f"workers_{w}": json.load(open(f"{work}/pipeline_{w}.json"))["pipeline"]
           for w in workers}, open(f"{work}/pipeline.json", "w"))
PY' "$work" "${PIPELINE_WORKERS:-4 8}" "${bench[@]}" --batch_size="$big"
}
# profiled NAME [OVERRIDE...]: cold_b32 under the compile profiler.
profiled() { cold_b32 "$1" 200 "${@:2}" "$(compile_profile "$1")"; }
step_profiled_b32() { profiled profiled_b32; }
step_transpose_b32() { profiled transpose_b32 --config.model.up_conv=transpose; }
step_strided_b32() { profiled strided_b32 --config.model.up_conv=transpose_strided_grads; }
step_autotune() {
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=${AUTOTUNE_LEVEL:-2}" profiled autotune
}
step_channels_b32() { cold_b32 channels_b32 150 --config.model.up_conv=phase_channels; }
step_overrides_b32() { cold_b32 overrides_b32 150 ${B32_OVERRIDES:-}; }
step_scan_b32() { cold_b32 scan_b32 120 --config.model.dense_block=scan; }
step_rendering() {
  run rendering 150 "${bench[@]}" --batch_size="$small" --steps=5 --rendering \
    --config.model.block_sizes="(1, 1, 1, 1)" --config.model.growth_rate=8 \
    --config.model.num_init_features=16 --output="$work/rendering.json"
}

for name in $steps; do
  if ! declare -F "step_$name" > /dev/null; then
    echo "gpu.sh: no step '$name' (ONLY names steps from the list at the top of $0)" >&2
    exit 2
  fi
done
mkdir -p "$out"
work=$(mktemp -d)
deadline=$(( $(date +%s) + ${BUDGET_S:-900} ))
# No GPU memory setting here: each step takes memory as its command would (the benchmark with
# --torch leaves PyTorch room by itself: runtime.tune_for_platform).
export PYTHONFAULTHANDLER=1 TF_CPP_MIN_LOG_LEVEL=2
: > "$out/log.txt"
bench=(python3 -m hded_jax.benchmark --config="$config" --max_wait=0 --warmup=2)
if env XLA_FLAGS="$(autotune_log)" \
    python3 -c 'import jax; jax.numpy.zeros(1).block_until_ready()' >> "$out/log.txt" 2>&1; then
  rm -f "$work/autotune_log.txt"
else
  echo "== this XLA has no --xla_gpu_dump_autotune_logs_to: no autotuning logs" >> "$out/log.txt"
  autotune_log() { echo "${XLA_FLAGS:-}"; }
fi
for name in $steps; do
  "step_$name"
done
python3 - "$work" $check <<'PY' | tee -a "$out/log.txt"
import json, os, sys
work, check = sys.argv[1], sys.argv[2:]
status = {name: json.load(open(f'{work}/{name}.status')) for name in check
          if os.path.exists(f'{work}/{name}.status')}
if status:
  ran = [name for name, s in status.items() if s['exit'] == '0']
  print(f"== the check's steps: {sum(s['seconds'] for s in status.values())} s "
        f"({len(ran)} of {len(check)} ran: {' '.join(ran)})")
PY
gzip -f "$out"/autotune_log_*.txt 2>/dev/null
echo "results in $out: $(ls "$out" | tr '\n' ' ')"
