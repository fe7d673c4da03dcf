"""The counting-sort layout kernel alone: current version vs the first one (kept in
``benchmarks/legacy/layout_v1.py`` for this comparison), GPU time from CUDA-graph replays.

Headline rows: B=4 H=48 N=16k (R = 192 rows per side), 16 and 64 buckets (aligned to 128) and
the drop layout (one segment, keys -1/0, capacity N/4). GPU only.
    python benchmarks/bench_layout.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
from flexsparse.kernels.layout import sorted_layout  # noqa: E402


def _load_v1():
    path = os.path.join(os.path.dirname(__file__), "legacy", "layout_v1.py")
    spec = importlib.util.spec_from_file_location("layout_v1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sorted_layout


def timer(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    v1 = _load_v1()
    R, N = 192, 16384
    cases = []
    for nb in (4, 16, 64):
        L = -(-(N + nb * 127) // 128) * 128
        cases.append((f"hash{nb}", torch.randint(0, nb, (R, N), device="cuda", dtype=torch.int32), nb, L, 128, -1))
    keep = torch.rand(R, N, device="cuda") >= 0.8
    cases.append(("drop0.8", torch.where(keep, 0, -1).to(torch.int8), 1, N // 4, 0, -1))
    rows = []
    for name, keys, nb, L, align, inv in cases:
        a = sorted_layout(keys, nb, L, align=align, invalid_pos=inv)
        b = v1(keys, nb, L, align=align, invalid_pos=inv)
        same = all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)
        row = {"case": name, "R": R, "N": N, "L": L, "same_as_v1": same}
        for tag, fn in (("v2", sorted_layout), ("v1", v1)):
            call = lambda fn=fn: fn(keys, nb, L, align=align, invalid_pos=inv)  # noqa: E731
            row[f"{tag}_eager_ms"] = timer(call)
            row[f"{tag}_gpu_ms"] = common.graph_time(call, timer)
        rows.append(row)
        print(row, flush=True)
    # chunk length sweep of the current kernel (GPU time)
    from flexsparse.kernels import layout as lay

    for name, keys, nb, L, align, inv in cases:
        NB = max(2, triton.next_power_of_2(nb))
        for ch in (c for c in (128, 256, 512, 1024, 2048) if c * NB <= 32768):
            lay._CHUNK[NB] = ch
            call = lambda: sorted_layout(keys, nb, L, align=align, invalid_pos=inv)  # noqa: E731
            ok = all(torch.equal(x, y) for x, y in zip(call(), v1(keys, nb, L, align=align, invalid_pos=inv)) if x is not None)
            row = {"case": name, "chunk": ch, "gpu_ms": common.graph_time(call, timer), "same_as_v1": ok}
            rows.append(row)
            print(row, flush=True)
        lay._CHUNK.clear()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(os.path.join(args.out, f"layout_{gpu}.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
