#!/usr/bin/env bash
# One call on a lent GPU (the device tool): the CUDA tests, then every benchmark, results under
# $OUT (the device tool's folder) or bench/results/gpu-<date>. The GPU image has torch, triton and
# transformers and no network, so the package is installed from source without dependencies.
#   run: bash bench/gpu_run.sh        (then commit the files it wrote under bench/results/)
set -uo pipefail
out=${OUT:-bench/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$out/environment.txt"

# CUDA tests: every kernel against the reference, compiled; determinism (bitwise reruns); the op;
# the integrations. The command line's tests (tests/cli) run on CPU and are left out.
python3 -m pytest -q -m 'not sweep' tests --ignore=tests/cli 2>&1 | tee "$out/tests.log" | tail -n 15

python3 -m desap_ops bench op --device cuda --dtype bf16 --out "$out/op-bf16.json" 2>&1 | tee "$out/op.txt"
python3 -m desap_ops bench e2e --model llava-1.5-7b --device cuda --keep 576,192,128,64 \
  --out "$out/e2e-llava-1.5-7b.json" --plot "$out/e2e-llava-1.5-7b.png" 2>&1 | tee "$out/e2e.txt"
python3 -m desap_ops bench e2e --model llava-next-7b --device cuda --keep 2928,1280,640,320 \
  --out "$out/e2e-llava-next-7b.json" 2>&1 | tee -a "$out/e2e.txt"
for model in qwen2.5-vl-7b llava-next-video-7b video-llava-7b; do
  python3 -m desap_ops bench e2e --model $model --device cuda --out "$out/e2e-$model.json" 2>&1 | tee -a "$out/e2e.txt"
done

# vLLM's V2 model runner (the default on CUDA) with DeSAP, LLaVA-1.5 and Qwen2.5-VL: the same
# engine tests as CI's CPU run (which can only start V1), against apply_desap position by position.
# Needs vLLM 0.32 beside the package; the GPU image has no network, so it runs only where vLLM is.
if python3 -c "import vllm" 2>/dev/null; then
  VLLM_USE_V2_MODEL_RUNNER=1 PYTHONPATH=tests/on_vllm python3 -m pytest -q tests/on_vllm/test_vllm_llava.py \
    tests/on_vllm/test_vllm_qwen2_5_vl.py tests/on_vllm/test_vllm_qwen_sweep.py 2>&1 | tee "$out/vllm-v2.log" | tail -n 15
  # Serving under load: vllm serve driven by vLLM's own vllm bench serve (random-mm) at concurrency
  # 1, 4, 16 and 64; the full model, DeSAP and the ideal at 64 of 576 tokens (the target's budget;
  # 16 of Qwen's 144). Random-weight checkpoints written once under ~/.cache/desap-ops/vllm.
  python3 -m desap_ops bench serve --model llava-1.5-7b --keep 64 \
    --out "$out/serve-llava-1.5-7b.json" --plot "$out/serve-llava-1.5-7b.png" 2>&1 | tee "$out/serve.txt"
  python3 -m desap_ops bench serve --model qwen2.5-vl-small --keep 16 \
    --out "$out/serve-qwen2.5-vl-small.json" --plot "$out/serve-qwen2.5-vl-small.png" 2>&1 | tee -a "$out/serve.txt"
else
  echo "vLLM is not installed here: the V2 engine runs and bench serve did not run" | tee "$out/vllm-v2.log"
fi
