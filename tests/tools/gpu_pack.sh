#!/bin/sh
# Pack what a GPU machine without a package registry needs to run the
# performance comparison (tests/tools/gpu_run.sh): the benchmark and the
# kernel profile, each bundled into one JavaScript file (tfjs included, no npm resolution needed there)
# and this Deno binary, xz-compressed, both under out/gpu/ (git-ignored;
# about 35 MB in all, inside the 64 MiB a device call can carry).
#
#   sh tests/tools/gpu_pack.sh
#   # then, on the GPU machine, from the repository root, with out/gpu carried:
#   sh tests/tools/gpu_run.sh "$OUT"
set -eu
cd "$(dirname "$0")/../.."
mkdir -p out/gpu
for tool in perf_table gpu_profile; do
  deno bundle --platform deno --minify -o "out/gpu/$tool.js" "tests/tools/$tool.ts"
done
deno_bin="$(readlink -f "$(command -v deno)")"
xz -T0 -6 -c "$deno_bin" > out/gpu/deno.xz.tmp
mv out/gpu/deno.xz.tmp out/gpu/deno.xz
deno --version | head -1 > out/gpu/deno.version
du -sh out/gpu/*
