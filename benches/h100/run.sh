#!/bin/bash
# How the H100 figures were taken: built here (cargo build --release --features bench
# --example report --example conformance --example resnet50_hooks; cargo test --release
# --no-run), stripped and gzipped into .dev/bin/ with tests/conformance/cases in
# .dev/cases, ../shared/bench/torch_cuda.py and benches/torch_half.py in .dev/, the
# Vulkan loader debs in .gl/ (the device README recipe); .dev/ and .gl/ carried.
# This is a copy of that .dev/run.sh (it expects to live in .dev/): bash .dev/run.sh all
# Device run (H100): tests + golden cases, the report twice (keep the second), PyTorch.
set -u
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
mkdir -p /work; [ -e /work/main ] || ln -sfn "$PWD" /work/main
mkdir -p /tmp/b; for f in .dev/bin/*.gz; do gunzip -c $f > /tmp/b/$(basename $f .gz); done; chmod +x /tmp/b/*
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $OUT/gpu.txt 2>&1
date -u >> $OUT/gpu.txt
MODE=${1:-all}
T0=$SECONDS
if [ "$MODE" = all ]; then
  timeout 200 bash -c 'for t in /tmp/b/test_*; do echo "== $t"; timeout 45 $t 2>&1 | grep -E "test result|FAILED|panicked|error" | head -8; done
   for d in .dev/cases tests/conformance/half tests/checkpoints/cases; do timeout 30 /tmp/b/conformance $d 2>&1 | tail -2; done
   timeout 30 /tmp/b/resnet50_hooks 2>&1 | tail -12' > $OUT/tests.txt 2>&1
  echo "tests done $((SECONDS-T0))s" >> $OUT/gpu.txt
  timeout 40 /tmp/b/report --full --dtype f32 --only copy --out /tmp/r0 > /dev/null 2>&1
  timeout 100 /tmp/b/report --full --out /tmp/r1 > $OUT/report_run1.txt 2>&1
  timeout 100 /tmp/b/report --full --out /tmp/r2 > $OUT/report.txt 2>&1
  echo "report done $((SECONDS-T0))s" >> $OUT/gpu.txt
  PYTHONUNBUFFERED=1 timeout 110 python3 .dev/torch_cuda.py --compile --out $OUT/torch.json > $OUT/torch.txt 2>&1
  for d in f16 bf16; do PYTHONUNBUFFERED=1 timeout 45 python3 .dev/torch_half.py $d .dev/torch_cuda.py > $OUT/torch_$d.txt 2>&1; done
  echo "torch done $((SECONDS-T0))s" >> $OUT/gpu.txt
fi
cat $OUT/gpu.txt; grep -E "test result|passed|FAILED|panicked" $OUT/tests.txt | sort | uniq -c | head -30
grep -E "^\| " $OUT/report.txt | grep -v "f16\|bf16" | cut -d'|' -f2,3,5,6,8,9 | head -45
