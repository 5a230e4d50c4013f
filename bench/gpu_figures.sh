#!/usr/bin/env bash
# The GPU figures issues 16 and 17 ask for, in one script of a few minutes (one CUDA GPU).
#
#   OUT=/some/dir bash bench/gpu_figures.sh        # run from the repository root
#
# Each benchmark writes one JSON file under $OUT (default bench/results/gpu); a failing one
# is logged and the others still run. Every script compares ratios inside its own run
# (reference vs kineflow, compact vs fixed-shape step, DFM vs AR), so the numbers need no
# CPU run beside them. Budget: about 6-8 minutes on an H100 / H200.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PYTHON:-python}

run() {  # run NAME CMD...: stdout -> $OUT/NAME.json, stderr -> $OUT/NAME.log
    local name=$1
    shift
    echo "== $name: $*" >&2
    if timeout 240 "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"; then
        echo "   ok" >&2
    else
        echo "   failed (exit $?), see $OUT/$name.log" >&2
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1

# Issue 16: the solver step (reference, compact, fixed-shape with the race sampler).
run solver_speed "$PY" bench/solver_speed.py --device cuda --extra-times ''
# Issue 16: the solver's share of a real-size (Janus-1.3B shapes) sampling step, bf16.
run inference_real "$PY" bench/inference.py --real --device cuda --dtype bfloat16 \
    --batch-sizes 1,8 --steps 4 --out "$OUT/inference_real_file.json"
# Issue 16: UniFluid image tokens/s with the static diffusion-head loop.
run unifluid_decoding "$PY" bench/unifluid_decoding.py --device cuda --dtype bfloat16 \
    --no-baseline --repeats 3 --out "$OUT/unifluid_decoding_file.json"
# Issue 17: the real-size training step (DFM and AR), MFU against the H100/H200 dense bf16 peak.
run train_real "$PY" bench/train_throughput.py --real --device cuda --peak-tflops 989 \
    --steps 10 --warmup 3 --compile
# Issue 17: tiny configs on the GPU: data wait and samples/s, in process and with workers.
run train_tiny "$PY" bench/train_throughput.py --device cuda --models fudoki unifluid \
    --workers 4 --steps 24 --warmup 4 --shards "$OUT/shards" --pack
ls -l "$OUT" >&2
