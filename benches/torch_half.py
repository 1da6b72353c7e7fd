"""PyTorch CUDA on the half-precision rows of wgnorm's report: runs
../shared/bench/torch_cuda.py (same ops and workloads) with torch's default dtype set to
float16 or bfloat16, so every tensor it makes is half (batch norm's running statistics
and weights too, which cuDNN also accepts in f32; the times barely differ).

usage: python3 torch_half.py {f16|bf16} PATH/TO/torch_cuda.py [--out FILE.json]

The script's "min bytes" and "GB/s" columns count 4-byte elements: halve them. Times
and the "/ torch copy bw" fraction (against the half copy) are as measured.
"""
import runpy
import sys

import torch

dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[sys.argv[1]]
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
torch.set_default_dtype(dtype)
print(f"default dtype: {torch.get_default_dtype()}", flush=True)
runpy.run_path(script, run_name="__main__")
