#!/bin/bash
# Device run: wgnorm-burn's tests and the training example (wgnorm-burn against burn's own ops).
set -u
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
mkdir -p /work; [ -e /work/main ] || ln -sfn "$PWD" /work/main
mkdir -p /tmp/bb; for f in .devb/*.gz; do gunzip -c $f > /tmp/bb/$(basename $f .gz); done; chmod +x /tmp/bb/*
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt 2>&1; date -u >> $OUT/gpu.txt
for t in modules; do echo "== $t"; timeout 60 /tmp/bb/burn_$t 2>&1 | grep -E "^test |test result|panicked" | head -20; done > $OUT/tests.txt 2>&1
for cfg in "--steps 30 --batch 16 --size 32" "--steps 30 --batch 64 --size 64" "--steps 30 --batch 128 --size 64"; do
  echo "== train $cfg"; timeout 120 /tmp/bb/burn_train $cfg 2>&1 | tail -8
  echo "== again"; timeout 120 /tmp/bb/burn_train $cfg 2>&1 | tail -3
done > $OUT/train.txt 2>&1
cat $OUT/gpu.txt $OUT/tests.txt $OUT/train.txt
