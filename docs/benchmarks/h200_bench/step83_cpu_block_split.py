# Step 83 (CPU): forward+backward ms (median of 15, after 3 warm-up calls) of one DilatedAttention
# with pattern.BLOCK_SPLIT 8 against 1 (whole blocks), alternated 8, 1, 8, 1 in one process.
# Usage, from the repository root: taskset -c 1 .venv/bin/python
#   docs/benchmarks/h200_bench/step83_cpu_block_split.py COMPILE N H D MIXING
# (COMPILE 1: the module compiled, 0: eager)
import time, torch, ringattn, sys
from ringattn import pattern
torch.set_num_threads(1)
n, h, d, mixing = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
segs = tuple(s for s in (32, 64, 128, 256, 512) if s <= n); rates = tuple(1 << i for i in range(len(segs)))
res = {}
for split in (8, 1, 8, 1):
    pattern.BLOCK_SPLIT = split
    att = ringattn.DilatedAttention(segs, rates, mixing=mixing, compile=sys.argv[1] == "1")
    q, k, v = (torch.randn(1, n, h, d, requires_grad=True) for _ in range(3))
    for _ in range(3): att(q, k, v).sum().backward()
    ts = []
    for _ in range(15):
        t = time.perf_counter(); att(q, k, v).sum().backward(); ts.append(time.perf_counter() - t)
    res.setdefault(split, []).append(sorted(ts)[7] * 1e3)
print(sys.argv[1:], {s: ["%.2f" % t for t in v] for s, v in res.items()})
