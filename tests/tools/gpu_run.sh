#!/bin/sh
# The performance comparison on a machine with an NVIDIA GPU, in order of
# value (a run cut short keeps what it did):
#   R. (skipped with DDPM_GPU_REPLAY=0) the training replay's tests (replayed
#      steps equal plain ones here too) and the host's time per base-64
#      training step, through tfjs and replayed (tests/tools/train_host.ts);
#   W. (skipped with DDPM_GPU_WGRAD=0) the weight gradient's scalar and vec4
#      programs at base 64, batch 64, by GPU time (conv_sweep.ts --only wgrad);
#   0. with DDPM_GPU_SWEEP=1, a tile sweep of the WebGPU convolution
#      (tests/tools/conv_sweep.ts);
#   1. with DDPM_GPU_PROFILE=1, a per-kernel and per-API-call profile of the
#      WebGPU forward pass and training step (tests/tools/gpu_profile.ts), base 64;
#   2. the reference PyTorch script (tests/reference/bench_reference.py,
#      float32, TF32 off) and this library on WebGPU (tests/tools/perf_table.ts)
#      at base 64 (forward batch 16, training batch 64, DDIM 10 steps on 8
#      images), then base 32 (DDPM_GPU_BASES sets the list, "" for none);
#      With DDPM_GPU_BIG=1, base 64 again with batch 64 throughout;
#      DDPM_GPU_ROUNDS=n measures each variant n times, interleaved (medians);
#   3. with DDPM_GPU_V8=1, a V8 sampling profile of forward passes
#      (v8.log.xz; read it with `node --prof-process`);
#   4. (skipped with DDPM_GPU_CLI=0) the command line's main job on the GPU: a short training run on
#      mnist-lite (DDPM_GPU_TRAIN_MIN minutes, 1.5 by default) and DDIM
#      sampling from its checkpoint;
#   5. 256 images by 50 DDIM steps from that checkpoint, replayed and through
#      tfjs (DDPM_WEBGPU_REPLAY=0), and whether the two are identical.
# Needs out/gpu/ from tests/tools/gpu_pack.sh (Deno and the bundled tools;
# the machine needs no package registry) and python3 with PyTorch. Where the
# machine has no Vulkan loader, put the Debian packages libvulkan1 (and the
# GL ones) as .deb files in .gl/ and carry that folder too: they are
# unpacked first. DDPM_GPU_CMD='...' runs that shell command (with $deno,
# $bin and $out set) instead of the steps. Writes its results to OUTDIR (default: $OUT, else
# out/gpu/results) and prints the tables.
#
#   sh tests/tools/gpu_run.sh [OUTDIR]
set -u
cd "$(dirname "$0")/../.."
root="$(pwd)"
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
xz -dc out/gpu/cli.js.xz > "$bin/cli.js" || exit 1
deno="$bin/deno"
export DENO_DIR="$bin/cache" DENO_NO_UPDATE_CHECK=1 XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  lscpu | grep "Model name"
  "$deno" --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} > "$out/gpu.txt"
cat "$out/gpu.txt"

if [ -n "${DDPM_GPU_CMD:-}" ]; then
  # A one-off check instead of the steps below, with $deno, $bin and $out set.
  eval "$DDPM_GPU_CMD"
  exit
fi

# DDPM_GPU_REPLAY=0 skips these two checks (about a minute and a half).
if [ "${DDPM_GPU_REPLAY:-1}" != 0 ]; then
echo "== replayed training steps equal plain ones on this GPU (tests/train_replay_test.ts)"
timeout 120 "$deno" test -A out/gpu/train_replay_test.js 2>&1 | tail -10 \
  || echo "train_replay_test failed"

echo "== host time per base-64 training step, through tfjs and replayed"
for mode in --plain ""; do
  timeout 90 "$deno" run -A out/gpu/train_host.js --base 64 $mode \
    || echo "train_host $mode failed"
done
fi

if [ "${DDPM_GPU_WGRAD:-1}" != 0 ]; then
echo "== W. weight gradients: scalar against vec4 program, base 64, batch 64"
timeout 90 "$deno" run -A out/gpu/conv_sweep.js --only wgrad --base 64 \
  --batch 64 --json "$out/wgrad64.json" 2>&1 | tee "$out/wgrad64.txt" \
  || echo "weight-gradient sweep failed"
fi

if [ -n "${DDPM_GPU_PROFILE:-}" ]; then
echo "== 1. WebGPU profile, base 64"
timeout 150 "$deno" run -A out/gpu/gpu_profile.js --base 64 \
  --forward-batch 16 --train-batch 64 --reps 5 \
  --batches "${DDPM_GPU_SUBMIT_BATCHES:-15}" \
  --json "$out/profile.json" > "$out/profile.txt" 2>&1 || echo "profile failed"
grep -v "^ .*x  [A-Za-z0-9]* \[" "$out/profile.txt"
fi

if [ -n "${DDPM_GPU_SWEEP:-}" ]; then
for batch in 64 8; do
  echo "== 0. convolution tile sweep, base 64, batch $batch"
  timeout 200 "$deno" run -A out/gpu/conv_sweep.js --base 64 --batch "$batch" \
    --only conv --json "$out/sweep$batch.json" 2>&1 | tee "$out/sweep$batch.txt" \
    || echo "sweep failed"
done
fi

for base in ${DDPM_GPU_BASES-64 32}; do
  echo "== 2. base $base: PyTorch"
  timeout 90 python3 tests/reference/bench_reference.py --base "$base" \
    --forward-batch 16 --train-batch 64 --sample-batch 8 --sample-steps 10 \
    --reps 10 --json "$out/torch$base.json" || echo "PyTorch run failed"
  echo "== 2. base $base: Deno on WebGPU"
  torch_arg=""
  [ -f "$out/torch$base.json" ] && torch_arg="--torch $out/torch$base.json"
  # shellcheck disable=SC2086
  timeout $((240 * ${DDPM_GPU_ROUNDS:-1})) "$deno" run -A out/gpu/perf_table.js --backends webgpu \
    --base "$base" --forward-batch 16 --train-batch 64 --sample-batch 8 \
    --sample-steps 10 --reps 5 --rounds "${DDPM_GPU_ROUNDS:-1}" $torch_arg --json "$out/deno$base.json" \
    | tee -a "$out/table.md" || echo "Deno WebGPU run failed"
  echo >> "$out/table.md"
done

if [ -n "${DDPM_GPU_BIG:-}" ]; then
  echo "== 2b. base 64, batch 64 throughout (forward, training, DDIM 10 steps)"
  timeout 90 python3 tests/reference/bench_reference.py --base 64 \
    --forward-batch 64 --train-batch 64 --sample-batch 64 --sample-steps 10 \
    --reps 10 --json "$out/torch64big.json" || echo "PyTorch run failed"
  torch_arg=""
  [ -f "$out/torch64big.json" ] && torch_arg="--torch $out/torch64big.json"
  # shellcheck disable=SC2086
  timeout $((240 * ${DDPM_GPU_ROUNDS:-1})) "$deno" run -A out/gpu/perf_table.js --backends webgpu \
    --base 64 --forward-batch 64 --train-batch 64 --sample-batch 64 \
    --sample-steps 10 --reps 5 --rounds "${DDPM_GPU_ROUNDS:-1}" $torch_arg --json "$out/deno64big.json" \
    | tee -a "$out/table.md" || echo "Deno WebGPU run failed"
fi

if [ -n "${DDPM_GPU_V8:-}" ]; then
echo "== 3. V8 profile of forward passes"
(cd "$bin" && timeout 60 "$deno" run -A \
  --v8-flags=--prof,--logfile=v8.log,--no-logfile-per-isolate \
  "$root/out/gpu/gpu_profile.js" --base 64 --forward-batch 16 --loop 30 &&
  xz -T0 -3 -c v8.log > "$out/v8.log.xz") || echo "V8 profile failed"
fi

if [ "${DDPM_GPU_CLI:-1}" != 0 ]; then
echo "== 4. main job: train ${DDPM_GPU_TRAIN_MIN:-1.5} min on mnist-lite, then sample"
run="$bin/run"
timeout 150 "$deno" run -A "$bin/cli.js" train --dataset mnist-lite \
  --time-limit "${DDPM_GPU_TRAIN_MIN:-1.5}" --out "$run" --no-samples 2>&1 | tail -4
timeout 90 "$deno" run -A "$bin/cli.js" sample \
  --checkpoint "$run/checkpoint.safetensors" --steps 20 --seed 0 \
  --out "$out/main_job_samples.png" 2>&1 | tail -3
echo "== 5. sample 256 images, 50 DDIM steps: replayed, then through tfjs (same images expected)"
for mode in 1 0; do
  DDPM_WEBGPU_REPLAY=$mode timeout 120 "$deno" run -A "$bin/cli.js" sample \
    --checkpoint "$run/checkpoint.safetensors" --steps 50 --n 256 --seed 0 \
    --format npy --out "$bin/replay$mode.npy" 2>&1 | tail -1
done
cmp "$bin/replay1.npy" "$bin/replay0.npy" && echo "replayed and tfjs images identical"
cp "$run/metrics.jsonl" "$out/main_job_metrics.jsonl" 2>/dev/null
fi
# A device call returns at most 8 files: everything also goes in one archive.
(cd "$out" && tar czf "$bin/results.tgz" . && mv "$bin/results.tgz" . &&
  rm -f deno*.json gpu.txt)
true
