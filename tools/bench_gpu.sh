#!/usr/bin/env bash
# The GPU measurements recorded in docs/benchmarks.md, one benchmark process per part, within a time budget.
# Usage: OUT=outputs/bench_gpu BUDGET=545 [PARTS="d0 d0_train d0_fit graph_fit d0_step d3_step focal d3 d3_profile fit_profile seg seg_train d0_train_compiled d3_compiled d3_train_compiled train_compiled graph_fit_compiled match"] bash tools/bench_gpu.sh
# JSON lines go to $OUT/<part>.jsonl, logs to $OUT/<part>.log (parts of the same name append); a part that
# would overrun the budget is cut short (the lines it printed so far are kept). FOCAL_IMPLS="torch" limits the
# focal part to the PyTorch loss (the default, auto, is what the other parts measure), FOCAL_BACKBONES="b0" to D0;
# MATCH_IMPLS="triton" limits the match part to the kernel;
# GRAPH_BACKBONES="b0" limits graph_fit and graph_fit_compiled to D0, COMPILED_BACKBONES="b3" train_compiled to D3;
# EXTRA="calibrate_bn=false ..." appends overrides to every benchmark call (e.g. calibrate_bn=false).
set -u
OUT=${OUT:-outputs/bench_gpu}
PY=${PY:-python3}
BUDGET=${BUDGET:-545}
PARTS=${PARTS:-"d0 d0_train d3 seg d0_train_compiled d3_compiled"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
start=$SECONDS

run() {  # run PART TIMEOUT OVERRIDES...
  local part=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  if ((left < 15)); then echo "== $part skipped: budget spent"; return 1; fi
  ((limit > left)) && limit=$left
  # shellcheck disable=SC2086  # EXTRA: overrides split on spaces
  timeout "$limit" $PY tools/benchmark.py device=cuda "$@" ${EXTRA:-} hydra.run.dir="/tmp/effdense_bench/$part" \
    >>"$OUT/$part.jsonl" 2>>"$OUT/$part.log"
  local rc=$?
  echo "== $part rc=$rc after $((SECONDS - start)) s"
  grep -v -i warn "$OUT/$part.log" | tail -n 12
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for p in $PARTS; do
  case $p in
  d0)  # D0 inference: both compiled (CUDA graphs), bf16, channels-last; batch 32 and batch 1
    run d0 300 backbone=b0 compare=effdet measures=[params,flops,agreement,predict,latency] profile=true
    rc=$?
    if ((rc != 0 && rc != 124)); then  # failed (not merely out of time): the same without compilation
      run d0 120 backbone=b0 compare=effdet fast.compile=false measures=[predict,latency]
    fi ;;
  d0_step)  # the D0 training step alone (both eager), profiled: where its GPU time goes
    run d0_step 90 backbone=b0 compare=effdet fast.compile=false measures=[train] iters=5 profile=true ;;
  d3_step)  # the D3 training step alone (both eager), profiled
    run d3_step 120 backbone=b3 compare=effdet fast.compile=false measures=[train] iters=3 profile=true ;;
  graph_fit)  # the Lightning loop with the training step captured as one CUDA graph (task.module.cuda_graph=true),
    # D0 and D3, against effdet's bare eager step in the same process
    for b in ${GRAPH_BACKBONES:-b0 b3}; do
      if [[ $b == b0 ]]; then iters=5 limit=120; else iters=3 limit=150; fi
      run graph_fit $limit backbone=$b compare=effdet fast.compile=false measures=[train,fit] iters=$iters task.module.cuda_graph=true
    done ;;
  graph_fit_compiled)  # the Lightning loop with the captured step running the compiled network
    # (task.module.cuda_graph=true task.module.compile=true), D3 then D0, against effdet's bare eager step (measured
    # alone: measures=[fit] compiles this project's network once, in the loop); D3 first, in a call of its own
    for b in ${GRAPH_BACKBONES:-b3 b0}; do
      if [[ $b == b3 ]]; then limit=480; else limit=240; fi
      run graph_fit_compiled $limit backbone=$b compare=effdet effdet_compile=false measures=[fit] iters=3 \
        task.module.cuda_graph=true
    done ;;
  match)  # anchor matching as the IoU matrix (impl=torch), then the kernel (impl=triton: an error where it cannot run;
    # auto would fall back with a warning): the D0 bare step with 100 boxes per image (effdet's
    # too), then the Lightning loop with the captured step (which pads every batch to 100 boxes), both profiled
    for impl in ${MATCH_IMPLS:-torch triton}; do
      run match 150 backbone=b0 compare=effdet fast.compile=false measures=[train,fit] iters=5 train_boxes=100 \
        task.module.cuda_graph=true task.module.assigner.matcher.impl=$impl profile=true
    done ;;
  fit_profile)  # where the Lightning loop's time goes beyond the bare step: D3, profiled steps of both
    run fit_profile 150 backbone=b3 fast.compile=false measures=[train,fit] iters=3 profile=true ;;
  d3_profile)  # D3 predict, training step (both with effdet) and the Lightning loop, all eager and profiled
    run d3_profile 150 backbone=b3 compare=effdet fast.compile=false measures=[predict,train,fit] iters=3 profile=true ;;
  d3)  # D3 predict (batch 16) and training (batch 8), both eager (bf16, channels-last), and the Lightning loop
    run d3 150 backbone=b3 compare=effdet fast.compile=false measures=[agreement,predict,train,fit] iters=5 ;;
  d0_train)  # D0 training step at batch 32, both eager, and in the Lightning loop (fit)
    run d0_train 120 backbone=b0 compare=effdet fast.compile=false measures=[ops,train,fit] iters=5 profile=true ;;
  d0_fit)  # the same without the profiles: operations and syncs, the bare step and the Lightning loop
    run d0_fit 90 backbone=b0 compare=effdet fast.compile=false measures=[ops,train,fit] iters=5 ;;
  focal)  # the training step with the focal loss as PyTorch operations, then as the Triton kernel (the CUDA default); D0, D3
    for impl in ${FOCAL_IMPLS:-torch auto}; do  # each with effdet in the same process, so the ratios compare across processes
      for b in ${FOCAL_BACKBONES:-b0 b3}; do
        run focal 90 backbone=$b compare=effdet fast.compile=false measures=[train] iters=5 task.module.loss.focal_impl=$impl
      done
    done ;;
  seg)  # segmentation, b0..b3, eager: predict at 1024x2048 (batch 4), the training step at the 512x1024 crop (batch 4)
    for b in b0 b1 b2 b3; do
      run seg 60 task=segmentation backbone=$b measures=[params,predict,train] fast.compile=false iters=5 rounds=2
    done ;;
  seg_train)  # the segmentation training step at the 512x1024 crop, eager, then the loop with the captured step, b0..b3
    for b in b0 b1 b2 b3; do
      run seg_train 60 task=segmentation backbone=$b measures=[ops,train] fast.compile=false iters=5 rounds=2
      run seg_train 60 task=segmentation backbone=$b measures=[fit] fast.compile=false iters=5 rounds=2 task.module.cuda_graph=true
    done ;;
  d0_train_compiled)  # training with both networks compiled (compilation of forward + backward takes minutes)
    run d0_train 300 backbone=b0 compare=effdet measures=[train] iters=5 ;;
  d3_compiled)  # D3 predict, both compiled (the CUDA default), profiled: where the compiled call's time goes
    run d3 300 backbone=b3 compare=effdet measures=[predict] profile=true ;;
  train_compiled)  # this project's training step compiled against effdet's eager step (only ours is compiled), D3, D0
    for b in ${COMPILED_BACKBONES:-b3 b0}; do
      run train_compiled 300 backbone=$b compare=effdet effdet_compile=false measures=[train] iters=3
    done ;;
  d3_train_compiled)  # the D3 training step, both eager, then both compiled (minutes of compilation)
    run d3_train_compiled 90 backbone=b3 compare=effdet fast.compile=false measures=[train] iters=3
    run d3_train_compiled 300 backbone=b3 compare=effdet measures=[train] iters=3 ;;
  *) echo "unknown part $p"; exit 2 ;;
  esac
done
