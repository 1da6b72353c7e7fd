#!/bin/bash
# One sitting on the GPU: the report (warm-up, then the full report) and PyTorch CUDA.
set -u
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
mkdir -p /tmp/b; gunzip -c .deva/bin/report.gz > /tmp/b/report; chmod +x /tmp/b/report
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt 2>&1; date -u >> $OUT/gpu.txt
T0=$SECONDS
timeout 40 /tmp/b/report --full --dtype f32 --out /tmp/r0 > /dev/null 2>&1
timeout 150 /tmp/b/report --full --out /tmp/r > $OUT/report.txt 2>&1
echo "report done $((SECONDS-T0))s" >> $OUT/gpu.txt
PYTHONUNBUFFERED=1 timeout 150 python3 .deva/torch_cuda.py --compile --out $OUT/torch.json > $OUT/torch.txt 2>&1
echo "torch done $((SECONDS-T0))s" >> $OUT/gpu.txt
for d in f16 bf16; do PYTHONUNBUFFERED=1 timeout 40 python3 .deva/torch_half.py $d .deva/torch_cuda.py > $OUT/torch_$d.txt 2>&1; done
echo "half done $((SECONDS-T0))s" >> $OUT/gpu.txt
cat $OUT/gpu.txt; tail -3 $OUT/torch.txt
