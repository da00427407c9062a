#!/bin/sh
# The performance comparison on a machine with an NVIDIA GPU: the
# reference PyTorch script (tests/reference/bench_reference.py, float32, TF32
# off) and this library on WebGPU, at the issue's sizes (UNet base 64,
# forward batch 16, training batch 64, DDIM 10 steps on 8 images), then at
# base 32, after a per-kernel profile of the WebGPU step
# (tests/tools/gpu_profile.ts). Needs out/gpu/ from tests/tools/gpu_pack.sh
# (Deno and the bundled tools; the machine needs no package registry) and
# python3 with PyTorch. Where the machine has no Vulkan loader, put the
# Debian packages libvulkan1 (and the GL ones) as .deb files in .gl/ and
# carry that folder too: they are unpacked first. Writes table.md,
# profile.json, deno*.json, torch*.json and gpu.txt to OUTDIR (default:
# $OUT, else out/gpu/results) and prints the tables.
#
#   sh tests/tools/gpu_run.sh [OUTDIR]
set -u
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-out/gpu/results}}"
mkdir -p "$out"
if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
  export VK_DRIVER_FILES="$icd"
fi
export DENO_WEBGPU_BACKEND="${DENO_WEBGPU_BACKEND:-vulkan}"
bin="$(mktemp -d)"
xz -dc out/gpu/deno.xz > "$bin/deno" && chmod +x "$bin/deno" || exit 1
export DENO_DIR="$bin/cache" DENO_NO_UPDATE_CHECK=1 XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1
  ldconfig -p | grep -c libvulkan | sed 's/^/libvulkan entries: /'
  echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  "$bin/deno" --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} > "$out/gpu.txt"
cat "$out/gpu.txt"

echo "== WebGPU kernel profile, base 64"
timeout 150 "$bin/deno" run -A out/gpu/gpu_profile.js --base 64 \
  --forward-batch 16 --train-batch 64 --reps 5 --json "$out/profile.json" \
  2>&1 | tee "$out/profile.txt" || echo "profile failed"

for base in 64 32; do
  echo "== base $base: PyTorch"
  timeout 120 python3 tests/reference/bench_reference.py --base "$base" \
    --forward-batch 16 --train-batch 64 --sample-batch 8 --sample-steps 10 \
    --reps 5 --json "$out/torch$base.json" || echo "PyTorch run failed"
  echo "== base $base: Deno on WebGPU"
  torch_arg=""
  [ -f "$out/torch$base.json" ] && torch_arg="--torch $out/torch$base.json"
  # shellcheck disable=SC2086
  timeout 150 "$bin/deno" run -A out/gpu/perf_table.js --backends webgpu \
    --base "$base" --forward-batch 16 --train-batch 64 --sample-batch 8 \
    --sample-steps 10 --reps 5 $torch_arg --json "$out/deno$base.json" \
    | tee -a "$out/table.md" || echo "Deno WebGPU run failed"
  echo >> "$out/table.md"
done
