#!/usr/bin/env bash
# One call on a lent GPU (the device tool): the CUDA tests, then every benchmark, results under
# $OUT (the device tool's folder) or bench/results/gpu-<date>. The GPU image has torch, triton and
# transformers and no network, so the package is installed from source without dependencies.
#   run: bash bench/gpu_run.sh        (then commit the files it wrote under bench/results/)
# Everything after the install runs from an empty folder: Python puts the working directory first
# on sys.path, and nothing there may shadow an installed package (tests/test_repository_root.py).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${OUT:-$root/bench/results/gpu-$(date -u +%Y%m%d)}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$root" || exit 1
cd "$(mktemp -d)" || exit 1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$out/environment.txt"

# CUDA tests: every kernel against the reference, compiled; determinism (bitwise reruns); the op;
# the integrations. The app's tests (the command line, the benchmarks, the test models: tests/cli,
# tests/benchmarks, tests/testing) run on CPU and are left out.
python3 -m pytest -q -m 'not sweep' "$root/tests" --ignore="$root/tests/cli" --ignore="$root/tests/benchmarks" \
  --ignore="$root/tests/testing" 2>&1 | tee "$out/tests.log" | tail -n 15

python3 -m desap_ops bench op --device cuda --dtype bf16 --out "$out/op-bf16.json" 2>&1 | tee "$out/op.txt"
python3 -m desap_ops bench e2e --model llava-1.5-7b --device cuda --keep 576,192,128,64 \
  --out "$out/e2e-llava-1.5-7b.json" --plot "$out/e2e-llava-1.5-7b.png" 2>&1 | tee "$out/e2e.txt"
python3 -m desap_ops bench e2e --model llava-next-7b --device cuda --keep 2928,1280,640,320 \
  --out "$out/e2e-llava-next-7b.json" 2>&1 | tee -a "$out/e2e.txt"
for model in qwen2.5-vl-7b llava-next-video-7b video-llava-7b; do
  python3 -m desap_ops bench e2e --model $model --device cuda --out "$out/e2e-$model.json" 2>&1 | tee -a "$out/e2e.txt"
done

# vLLM with DeSAP, LLaVA-1.5, Qwen2.5-VL and Qwen3-VL: the same engine tests as CI's CPU run, against
# apply_desap position by position, on the vLLM installed here (the GPU image has no network). From
# vLLM 0.34 the V2 model runner is the only one (and VLLM_USE_V2_MODEL_RUNNER=0 is refused); on
# 0.32 and 0.33 it is the CUDA default where it supports the model, and both runners run here.
if python3 -c "import vllm" 2>/dev/null; then
  python3 -c "import vllm; print('vllm', vllm.__version__)" | tee -a "$out/environment.txt"
  engine_tests="$root/tests/on_vllm/test_vllm_llava.py $root/tests/on_vllm/test_vllm_qwen2_5_vl.py
    $root/tests/on_vllm/test_vllm_qwen_sweep.py $root/tests/on_vllm/test_vllm_qwen3_vl.py"
  if python3 -c "import vllm.v1.worker.gpu_model_runner" 2>/dev/null; then runners="1 0"; else runners="only"; fi
  for runner in $runners; do
    if [ "$runner" = only ]; then unset VLLM_USE_V2_MODEL_RUNNER; else export VLLM_USE_V2_MODEL_RUNNER=$runner; fi
    echo "== VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER-unset}" | tee -a "$out/vllm-engines.log"
    # shellcheck disable=SC2086
    PYTHONPATH="$root/tests/on_vllm" python3 -m pytest -q $engine_tests 2>&1 | tee -a "$out/vllm-engines.log" | tail -n 15
  done
  unset VLLM_USE_V2_MODEL_RUNNER
  # Serving under load: vllm serve driven by vLLM's own vllm bench serve (random-mm) at concurrency
  # 1, 4, 16 and 64; the full model, DeSAP and the ideal at 64 of 576 tokens (the target's budget;
  # 16 of Qwen's 144). Random-weight checkpoints written once under ~/.cache/desap-ops/vllm.
  python3 -m desap_ops bench serve --model llava-1.5-7b --keep 64 \
    --out "$out/serve-llava-1.5-7b.json" --plot "$out/serve-llava-1.5-7b.png" 2>&1 | tee "$out/serve.txt"
  python3 -m desap_ops bench serve --model qwen2.5-vl-small --keep 16 \
    --out "$out/serve-qwen2.5-vl-small.json" --plot "$out/serve-qwen2.5-vl-small.png" 2>&1 | tee -a "$out/serve.txt"
else
  echo "vLLM is not installed here: the engine tests and bench serve did not run" | tee "$out/vllm-engines.log"
fi
