"""BENCHMARKS.md's H100 table from one sitting's raw outputs in this folder: wgnorm's
report (report.txt) against PyTorch (torch.txt with --compile; torch_f16.txt and
torch_bf16.txt from ../torch_half.py). usage: python3 table.py [DIR]"""
import re
import sys

d = sys.argv[1] if len(sys.argv) > 1 else "."


def rows(path):
    out = []
    for line in open(f"{d}/{path}"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 6 and not cells[0] in ("op", "---"):
            out.append(cells)
    return out


def us(s):
    m = re.match(r"([\d.]+) (us|ms)", s)
    if not m:
        return None
    v = float(m.group(1))
    return v * 1000 if m.group(2) == "ms" else v


def fmt(v):
    return "-" if v is None else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.1f} us")


torch = {}
for suffix, path in [("", "torch.txt"), ("_f16", "torch_f16.txt"), ("_bf16", "torch_bf16.txt")]:
    for c in rows(path):
        torch[(c[0], c[1] + suffix)] = (us(c[3]), us(c[6]) if len(c) > 6 else None)

print("| op | workload | min bytes | wgnorm kernel (median / min) | end to end | / copy bw | PyTorch eager | torch.compile | wgnorm vs best PyTorch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for c in rows("report.txt"):
    if len(c) < 8 or not c[3].endswith("s"):
        continue
    op, wl = c[0], c[1]
    k, kmin, e2e = us(c[3]), us(c[4]), us(c[5])
    eager, comp = torch.get((op, wl), (None, None))
    best = min(x for x in (eager, comp) if x is not None) if eager else None
    ratio = f"{best / k:.2f}x" if best and k else "-"
    print(f"| {op} | {wl} | {c[2]} | {fmt(k)} / {fmt(kmin)} | {fmt(e2e)} | {c[7]} | {fmt(eager)} | {fmt(comp)} | {ratio} |")
