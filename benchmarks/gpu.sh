#!/usr/bin/env bash
# The GPU benchmarks in one command, all outputs in one folder: about 9 minutes on one H100, the
# broad attention sweep last (a run cut short keeps every earlier output).
#
#   OUT=results_h100 bash benchmarks/gpu.sh
#
# Writes fused.{csv,log}, fused_options.json, filter.{csv,log}, ptxas.{csv,log},
# ptxas_output.log, compile_memory.{csv,log}, filter_attention.log with
# filter_attention/attention.{csv,png}, model_step.{csv,log}, model_step_filter.log with
# model_step_filter/model_step.csv, and attention.{csv,png,log} to $OUT (default
# benchmarks/out/gpu), each as soon as its step ends.
# Needs jax with CUDA, flax, optax, orbax-checkpoint, and for model_step ml-collections (its
# configs), grain and tensorboardX (the trainer's imports), and this repository; torch and
# matplotlib are optional, TensorFlow is not used. $PYTHON picks the interpreter; FUSED_ARGS,
# FILTER_ARGS, PTXAS_ARGS, COMPILE_MEMORY_ARGS, FILTER_ATTENTION_ARGS, MODEL_STEP_ARGS (both
# model_step runs) and ATTENTION_ARGS append flags (later flags win), e.g. to shrink them for a
# check on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out/gpu}"
python="${PYTHON:-python}"
mkdir -p "$out"
status=0

# The fused kernel checked against lax.top_k on the device, the exact selections timed, and the
# kernel's block sizes tuned (about a minute); the fastest options go to the benchmarks below.
# shellcheck disable=SC2086  # the *_ARGS variables are flag lists
"$python" -m benchmarks.fused --out "$out" ${FUSED_ARGS:-} 2>&1 | tee "$out/fused.log"
status=$((status | PIPESTATUS[0]))
options="$out/fused_options.json"

# The experimental one-pass filter kernel (topk.filter, off by default): checked on the device at
# 2K (bfloat16, float32, causal and not), with the select-and-mix kernel (topk.select_mix), then
# timed alone against the present kernel at 16K and 64K for two block shapes, with candidates
# per row and redo fraction; filter.csv after each row.
# shellcheck disable=SC2086
"$python" -m benchmarks.filter --out "$out" --tilings 64:64:4:8,64:128:8:8 ${FILTER_ARGS:-} \
  2>&1 | tee "$out/filter.log"
status=$((status | PIPESTATUS[0]))
[ -f "$options" ] || echo '{}' >"$options"

# Registers and spills of both fused kernels (ptxas -v on their PTX; under a minute), and the
# memory of forward+backward at 1M tokens for the unfused path and both kernels, compiled only
# (under a minute): ptxas.{csv,log}, ptxas_output.log, compile_memory.{csv,log}.
# shellcheck disable=SC2086
"$python" -m benchmarks.ptxas --out "$out" ${PTXAS_ARGS:-} 2>&1 | tee "$out/ptxas.log"
status=$((status | PIPESTATUS[0]))
# shellcheck disable=SC2086
"$python" -m benchmarks.compile_memory --out "$out" --fused_options "$options" \
  ${COMPILE_MEMORY_ARGS:-} 2>&1 | tee "$out/compile_memory.log"
status=$((status | PIPESTATUS[0]))

# topk_attention with the filter variant (forms topk_filter, and topk_filter_mix: selecting and
# mixing in a kernel) against the compact kernel, the unfused path and cuDNN flash: forward and
# forward+backward at 16K and 64K in bfloat16, no length search; its own time budget (100 s)
# keeps it within about 2 minutes.
# shellcheck disable=SC2086
"$python" -m benchmarks.attention --out "$out/filter_attention" --fused_options "$options" \
  --forms cudnn,topk,topk_fused,topk_filter,topk_filter_mix --lengths 16384,65536 \
  --dtypes bfloat16 \
  --no-search_longest --no-time_longest --budget_s 100 ${FILTER_ATTENTION_ARGS:-} \
  2>&1 | tee "$out/filter_attention.log"
status=$((status | PIPESTATUS[0]))

# Full-size training steps in bfloat16, ListOps first; no new config starts after 90 s (one may
# take up to about a minute to compile). JAX may use 95% of the card here (no torch in this
# process), so "fits" means fits the card, not JAX's default 75% share. Then the ListOps step
# with the filter variant against vanilla's (model_step_filter/, 45 s).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# shellcheck disable=SC2086
"$python" -m benchmarks.model_step --all --dtype bfloat16 --budget_s 90 --out "$out" \
  --fused both --fused_options "$options" ${MODEL_STEP_ARGS:-} 2>&1 | tee "$out/model_step.log"
status=$((status | PIPESTATUS[0]))
# shellcheck disable=SC2086
"$python" -m benchmarks.model_step --all --tasks listops --kinds vanilla,topk --dtype bfloat16 \
  --budget_s 45 --out "$out/model_step_filter" --fused on --fused_variant filter \
  --fused_options "$options" ${MODEL_STEP_ARGS:-} 2>&1 | tee "$out/model_step_filter.log"
status=$((status | PIPESTATUS[0]))

# Attention forms versus length, last (the broadest sweep); its own time budget (60 s) keeps it
# within about 2 minutes.
# shellcheck disable=SC2086
"$python" -m benchmarks.attention --out "$out" --fused_options "$options" --budget_s 60 \
  ${ATTENTION_ARGS:-} 2>&1 | tee "$out/attention.log"
status=$((status | PIPESTATUS[0]))

echo "outputs in $out"
exit "$status"
