#!/usr/bin/env bash
# One call on a lent GPU: install moe_fx into the machine's own torch (no downloads), run the GPU tests
# (bf16, real Triton, CUDA graphs), the host-overhead probe, then whatever benchmark is named.
#
#   bash bench/gpu_check.sh OUT [tests] [chain] [routed] [sort] [widths] [verify] [fuzz] [host] [hf] [defaults] [tma] [decode] [tune-decode] [tune-prefill] [persistent]
#       [table-prefill] [table-decode] [layer ARGS...]
#   (layer takes the rest)
#
# e.g. bash bench/gpu_check.sh $OUT tests host layer --variants moe_fx_triton moe_fx_int4
# Each step writes its log under OUT; a failing step does not stop the next one.
set -uo pipefail
out=$1
shift
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
# the machine's python holds torch/triton/transformers; --no-build-isolation: nothing to fetch
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
lend_fused() {  # a GPU with no fused entries of its own (an H200) gets the H100's under its name: else nothing routes
  export MOE_FX_TUNING_CACHE="$out/routed_cache.json"
  python - <<'PY'
import json, os, torch
from moe_fx.lowering.triton import tuning
here, h100 = tuning.device_name(torch.device("cuda")), "NVIDIA_H100_80GB_HBM3"
entries = json.loads(tuning.PACKAGED.read_text())
lent = {k.replace(h100, here): v for k, v in entries.items() if v.get("fused") and h100 in k and here != h100}
json.dump(lent, open(os.environ["MOE_FX_TUNING_CACHE"], "w"), indent=1)
print(f"{here}: {len(lent)} fused entries lent from the H100's")
PY
}
decode_chain() {
  timeout 150 python bench/decode_chain.py --out "$out" 2>&1 | grep -v "^wrote" | tee "$out/decode_chain.log"
}
while [ $# -gt 0 ]; do
  step=$1
  shift
  case $step in
    tests)
      timeout 420 python -m pytest -q -n 12 tests/lowering/triton tests/test_cuda.py tests/lowering/vendor \
        tests/passes/test_quantize_weights.py tests/lowering/test_quant.py tests/test_autotune.py 2>&1 \
        | tee "$out/gpu_tests.log" | tail -8 ;;
    chain)  # the decode chain against routed_experts' two kernels (fuse_route), T=1 and 4
      lend_fused
      decode_chain
      unset MOE_FX_TUNING_CACHE ;;
    routed)  # chain, then the layer (routed, as the rewrite runs it, and the four-op chain), T=1 and 4
      lend_fused
      decode_chain
      timeout 200 python bench/layer.py --out "$out" --shapes qwen3 gptoss --T 1 4 --profile \
        --variants moe_fx_triton moe_fx_triton_combine moe_fx_fp8 2>&1 | grep -v "it/s" \
        | tee "$out/layer_routed.log"
      unset MOE_FX_TUNING_CACHE ;;
    sort)  # the two-launch sort's SORT_PROGRAMS settings at T=8192, one dispatch each
      timeout 200 python bench/sort_programs.py --out "$out" 2>&1 | grep -v "^wrote" | tee "$out/sort_programs.log" ;;
    widths)  # fused decode configs' w2 block widths and warps (tuning.FUSED_BLOCK_D), each checked, then timed
      timeout 540 python bench/fused_widths.py --out "$out" 2>&1 | grep -v "^wrote" | tee "$out/fused_widths.log" ;;
    verify)  # every tuning candidate against the reference lowering, every quant mode, ragged shapes
      timeout 540 python bench/verify_candidates.py --out "$out" 2>&1 | tee "$out/verify_candidates.log" ;;
    fuzz)  # random experts problems and tiles against the reference lowering, bf16, ~8 minutes
      timeout 570 python bench/fuzz_experts.py --out "$out" --cases 20000 --seconds 500 2>&1 | tee "$out/fuzz_experts.log" ;;
    host)
      python bench/host_overhead.py --out "$out" --profile ;;
    hf)
      timeout 420 python bench/hf_models.py --out "$out" 2>&1 | tee "$out/hf_models.log" ;;
    defaults)
      timeout 120 python bench/defaults.py --out "$out" 2>&1 | tee "$out/defaults.log" ;;
    tma)
      timeout 300 python bench/gemm_paths.py --out "$out" 2>&1 | grep -v "it/s" | tee "$out/gemm_paths.log" ;;
    decode)  # pointers against swapped operands at decode for the modes whose tiles changed untimed
      timeout 420 python bench/gemm_paths.py --out "$out" --T 1 16 128 --quant int4_weight fp8 \
        --paths pointers swap 2>&1 | grep -v "it/s" | tee "$out/gemm_paths_decode.log" ;;
    tune-decode)  # T=1 entries: shipped against every device's, a fresh graph-timed tuning and the default
      MOE_FX_TUNING_CACHE="$out/tuning_cache.json" timeout 540 python bench/retune.py --out "$out" 2>&1 \
        | grep -v "it/s" | tee "$out/retune_decode.log" ;;
    tune-prefill)  # T=1024/8192 bf16 entries against a fresh tuning over TMA tiles
      MOE_FX_TUNING_CACHE="$out/tuning_cache.json" timeout 540 python bench/retune.py --out "$out" --tiles prefill \
        --quant none --T 1024 8192 2>&1 | grep -v "it/s" | tee "$out/retune_prefill.log" ;;
    persistent)  # persistent programs against one program per tile, at prefill (tuning candidates since 2026-12-05)
      timeout 540 python bench/gemm_paths.py --out "$out" --T 1024 8192 --quant none fp8 \
        --paths pointers tma persistent 2>&1 | grep -v "it/s" | tee "$out/gemm_paths_persistent.log" ;;
    table-prefill | table-decode)  # what the rewrite runs against every peer, in one run: docs/performance.md's
      # standing table takes the committed JSON (one call each: the 600 s a call may take)
      Ts="1024 8192"
      [ "$step" = table-decode ] && Ts="1 16 128"
      # shellcheck disable=SC2086
      timeout 570 python bench/layer.py --out "$out" --T $Ts --variants hf_eager hf_gmm hf_gmm_compiled sort_gmm \
        moe_fx_triton moe_fx_fp8 2>&1 | grep -v "it/s" | tee "$out/$step.log" ;;
    layer)
      python bench/layer.py --out "$out" "$@" 2>&1 | tee "$out/layer.log"
      shift $# ;;
    *)
      echo "unknown step $step" ;;
  esac
done
