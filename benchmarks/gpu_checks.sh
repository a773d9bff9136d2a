#!/usr/bin/env bash
# The checks only an accelerator can show, as one script for one short lease of a GPU machine:
# BERT train-step throughput and MFU (bf16/f32, gathered/full head), BERT-base end to end through
# launch.py (data pipeline, checkpoint included), the MLM-reduction ablation run longer than a CPU
# allows, and the scan and MLM-head benchmarks on the GPU. Every step has its own time limit and
# writes its log under $OUT, so a step that fails or runs long costs only its own slot.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh          # on the GPU machine, from the repo root
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_checks.sh  # a CPU dry run of every step (minutes)
#
# Limits from the H200 lease of 2026-11-26 (jax 0.11.2): each BERT-base row compiles in 21-35 s;
# base end to end took ~110 s for 200 steps (start-up 66 s); the 1,500-step ablation 90 s; the
# scan benchmark needs ~90 s at 3 repeats; the head benchmark 19 s. Keep the sum under 570 s.
set -u
OUT=${OUT:-/tmp/maskax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MASKAX_CACHE=${MASKAX_CACHE:-/tmp/maskax_cache}
WORK=${WORK:-/tmp/maskax_runs}
PY=${PY:-python3}

step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit)"
  grep -E '^\||resumed|Error|error:' "$OUT/$name.log" | tail -n 40
}

if [ -n "${QUICK:-}" ]; then
  bench=(--quick) base=smoke steps=4 abl_steps=20 eval_every=10 scan=(--quick) head=(--quick)
else
  bench=(--peak_tflops=989 --windows 2) base=base steps=200 abl_steps=1500 eval_every=250
  scan=(--repeats 3) head=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__, jax.devices())"

step bert_step 200 $PY benchmarks/bert_step_bench.py "${bench[@]}"
step bert_base 140 $PY launch.py --config="experiments/bert_pretrain.py:$base" \
  --config.train.steps=$steps --config.train.log_every=50 --workdir="$WORK/bert_base"
grep -E "step +[0-9]+/" "$OUT/bert_base.log" | tail -n 4
step ablation 110 $PY launch.py --config=experiments/bert_pretrain.py:ablation \
  --config.train.steps=$abl_steps --config.train.eval_every=$eval_every \
  --config.train.checkpoint_every=100000 --workdir="$WORK/ablation" \
  --sweep=loss.mlm_reduction=masked,masked_sum_over_nonpad,all_nonpad_tokens,all_tokens
cp "$WORK"/ablation/results.md "$WORK"/ablation/results.png "$OUT"/ 2>/dev/null
step scan_bench 90 $PY benchmarks/scan_bench.py "${scan[@]}"
step mlm_head_bench 30 $PY benchmarks/mlm_head_bench.py "${head[@]}"
