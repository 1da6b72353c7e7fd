#!/bin/bash
# Device run: the test binaries and golden cases at the overflow-safe sums, then an A/B of
# the report (f32) before (base) and after (new), alternated twice on one machine.
set -u
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
mkdir -p /work; [ -e /work/main ] || ln -sfn "$PWD" /work/main
mkdir -p /tmp/b; for f in .deva/bin/*.gz; do gunzip -c $f > /tmp/b/$(basename $f .gz); done; chmod +x /tmp/b/*
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt 2>&1; date -u >> $OUT/gpu.txt
T0=$SECONDS
timeout 200 bash -c 'for t in /tmp/b/test_magnitudes /tmp/b/test_batch_norm /tmp/b/test_weight_standardization /tmp/b/test_weight_norm /tmp/b/test_spectral_norm /tmp/b/test_sync_batch_norm; do echo "== $t"; timeout 60 $t 2>&1 | grep -E "test result|FAILED|panicked|relative error" | head -8; done
  for d in .deva/cases tests/conformance/half tests/checkpoints/cases; do timeout 30 /tmp/b/conformance $d 2>&1 | tail -2; done' > $OUT/tests.txt 2>&1
echo "tests done $((SECONDS-T0))s" >> $OUT/gpu.txt
timeout 60 /tmp/b/report_new --full --dtype f32 --only ws_ --out /tmp/r0 > /dev/null 2>&1
for i in 1 2; do for v in base new; do
  timeout 100 /tmp/b/report_$v --full --dtype f32 --out /tmp/r_$v$i > $OUT/report_${v}_$i.txt 2>&1
done; done
echo "reports done $((SECONDS-T0))s" >> $OUT/gpu.txt
cat $OUT/gpu.txt; grep -E "test result|passed|FAILED|panicked" $OUT/tests.txt | sort | uniq -c
