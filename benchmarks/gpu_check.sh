#!/usr/bin/env bash
# The GPU check of ONNX Runtime's fused graphs (export --ort-fused; issue 12), one prepared script for the lent
# GPU machine (../shared/gpu/README.md). From this machine, once:
#   EXTRA="pytest pluggy iniconfig pygments packaging" bash ../shared/gpu/prepare_carry.sh   # + pytest
# then send the carry commands it prints back to back, the last one ending in:
#   . /tmp/gpuenv && bash benchmarks/gpu_check.sh [STAGE ...]
# Stages, in the order given (default: tests sd15 options sdxl), with their device time on an H100 (estimates):
#   tests    pytest -m gpu on the tiny models: tests/test_ort_fusion.py (the fused fp16 graphs on ORT CUDA within
#            2e-2 x max(1, max |plain fp32|) of the plain graph on the CPU, one pinned session per shape) and
#            tests/test_gpu.py                                                                    ~2 min
#   sd15     make bench rows, SD-1.5-shaped (random weights) 512x512, UNet batch 2, 30 steps: ort-cuda (fused
#            fp16) against diffusers eager, + CUDA graph, + torch.compile; the first run exports and fuses; then
#            the fused fp16 UNet and VAE against the plain fp16 ones at that shape (benchmarks/fused_parity.py) ~4 min
#   options  ort-cuda alone under each CUDA provider option (SDTRT_ORT_CUDA_OPTIONS), same shape   ~3 min
#   sdxl     the sd15 rows for SDXL-shaped 1024x1024, UNet batch 2                                  ~6 min
# So `tests sd15` fits one 10-minute call; `options` and `sdxl` each another.
# What it writes goes under $OUT (the device's return folder; default benchmarks/results/gpu-check): the GPU's
# name, the test log, one JSONL file of rows per stage (options: one per option set) and a summary of ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
stages=${*:-tests sd15 options sdxl}
PY=${PY:-python3}
BENCH=(--height 512 --width 512 --batch 2 --steps 30 --no-report)
PEERS=(ort-cuda torch torch-graph torch-compile)
# each option set against the default (""): how cuDNN picks convolutions, NHWC, and the attention kernel
OPTION_SETS=("" "cudnn_conv_algo_search=HEURISTIC" "cudnn_conv_use_max_workspace=0" "prefer_nhwc=1" \
    "sdpa_kernel=1" "sdpa_kernel=2" "sdpa_kernel=8")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
# sdtrt's subpackages live in engine/ export/ runtime/ (setuptools package-dir): install the tree, without deps
$PY -c "import sdtrt.engine.manifest" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
$PY -c "import onnxruntime as o; o.preload_dlls(); assert 'CUDAExecutionProvider' in o.get_available_providers()"

for stage in $stages; do
    echo "== $stage  $(date -u +%T)"
    case $stage in
    tests)
        $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_ort_fusion.py tests/test_gpu.py 2>&1 \
            | tee "$OUT/tests.log" || true  # the results are in the log; the benchmarks still run
        ;;
    sd15)
        $PY -m benchmarks.run --model sd15 "${BENCH[@]}" --backend "${PEERS[@]}" --out "$OUT/sd15.jsonl"
        $PY -m benchmarks.fused_parity artifacts/bench/sd15/onnx-fp16 --side 64 --out "$OUT/sd15-parity.json"
        ;;
    options)
        for options in "${OPTION_SETS[@]}"; do
            name=${options:-default}
            SDTRT_ORT_CUDA_OPTIONS="$options" $PY -m benchmarks.run --model sd15 "${BENCH[@]}" --backend ort-cuda \
                --e2e-runs 1 --out "$OUT/options-${name//[=,]/-}.jsonl"
        done
        ;;
    sdxl)
        $PY -m benchmarks.run --model sdxl --height 1024 --width 1024 --batch 2 --steps 30 --no-report \
            --backend "${PEERS[@]}" --out "$OUT/sdxl.jsonl"
        $PY -m benchmarks.fused_parity artifacts/bench/sdxl/onnx-fp16 --side 128 --out "$OUT/sdxl-parity.json"
        ;;
    *)
        echo "unknown stage $stage (tests, sd15, options, sdxl)" >&2
        exit 2
        ;;
    esac
done
$PY -m benchmarks.gpu_summary "$OUT" | tee "$OUT/summary.md"
