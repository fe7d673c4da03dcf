"""SCFA patterns end to end on the GPU: hash-sparse and query/key-drop attention through
flexsparse (Triton mask kernels + compiled FlexAttention) against dense causal SDPA (flash and
cuDNN backends), dense causal FlexAttention, and the plain FlexAttention recipe a user would
write (same sort/compaction, ``torch.gather`` permutations, ``torch.compile(create_block_mask)``).

Every time is a median over CUDA-event timed iterations after warm-up, end to end (sorting,
gathers, mask building and the scatter back included); dense baselines run in the same process.

GPU only. Usage:
    python benchmarks/bench_scfa.py --out DIR            # headline: B=4 H=48 D=64 S=16k
    python benchmarks/bench_scfa.py --out DIR --full     # the whole grid of the issue + 128k
Writes ``scfa_<grid>_<gpu>.json`` to --out and prints rich tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys

import torch
import triton
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexsparse  # noqa: E402
import common  # noqa: E402
from flexsparse.patterns.drop import capacity_for_rate  # noqa: E402
from flexsparse.patterns.permuted import make_mask_mod  # noqa: E402

console = Console(width=160)
flex_c = torch.compile(flex_attention, dynamic=False)
cbm_c = torch.compile(create_block_mask, dynamic=False)


COMPILE_ONLY = False  # --compile-only: run each case once (fills the compile caches), time nothing


TARGET_MS = 400.0  # measuring time per timed case (--target-ms)


def time_ms(fn, target_ms=None, min_iters=5, max_iters=200):
    """Median of per-iteration CUDA-event times (ms) after two warm-up calls."""
    target_ms = TARGET_MS if target_ms is None else target_ms
    if COMPILE_ONLY:
        fn()
        torch.cuda.synchronize()
        return float("nan")
    fn()
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    n = int(min(max_iters, max(min_iters, target_ms / est)))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2]


def graph_ms(fn):
    """GPU time of ``fn`` replayed from a CUDA graph (no host overhead), or None."""
    return None if COMPILE_ONLY else common.graph_time(fn, time_ms)


def peak_mib(fn):
    if COMPILE_ONLY:
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_and_fwdbwd(op, q, k, v, do):
    def fwd():
        with torch.no_grad():
            op(q, k, v)

    def fb():
        o = op(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    return fwd, fb


def sdpa_op(backend):
    def op(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return op


def flex_dense_op(N, B, H):
    # compiled: the eager create_block_mask materialises [N, N] (128 GiB at 128k)
    bm = cbm_c(lambda b, h, q, k: q >= k, None, None, N, N, device="cuda")

    def op(q, k, v):
        return flex_c(q, k, v, block_mask=bm)

    return op


def _gather(t, idx):
    return torch.gather(t, 2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


def plain_flex_hash(qb, kb):
    """What a FlexAttention user writes: sort, gather, compiled create_block_mask, scatter back."""

    def op(q, k, v):
        B, H, N, _ = q.shape
        qbs, q_perm = torch.sort(qb, dim=-1, stable=True)
        kbs, k_perm = torch.sort(kb, dim=-1, stable=True)
        mm = make_mask_mod(q_perm.int(), k_perm.int(), q.shape[1] // k.shape[1], qbs, kbs)
        bm = cbm_c(mm, B, H, N, N, device="cuda")
        o = flex_c(_gather(q, q_perm), _gather(k, k_perm), _gather(v, k_perm), block_mask=bm)
        return _gather(o, torch.argsort(q_perm, -1))

    return op


def plain_flex_drop(qk, kk):
    def op(q, k, v):
        B, H, N, _ = q.shape
        q_perm = torch.sort((~qk).to(torch.uint8), dim=-1, stable=True)[1]
        k_perm = torch.sort((~kk).to(torch.uint8), dim=-1, stable=True)[1]
        n_q, n_k = qk.sum(-1, keepdim=True), kk.sum(-1, keepdim=True)
        slots = torch.arange(N, device=qk.device)
        q_pos = torch.where(slots < n_q, q_perm, -1).int()
        k_pos = torch.where(slots < n_k, k_perm, N).int()
        mm = make_mask_mod(q_pos, k_pos, q.shape[1] // k.shape[1], None, None)
        bm = cbm_c(mm, B, H, N, N, device="cuda")
        o = flex_c(_gather(q, q_perm), _gather(k, k_perm), _gather(v, k_perm), block_mask=bm)
        o = _gather(o, torch.argsort(q_perm, -1))
        return torch.where(qk.unsqueeze(-1), o, 0)

    return op


def kept_block_fraction(pm, N, bs=128):
    """Non-empty blocks of the sparse mask / blocks of dense causal attention at length N."""
    n = math.ceil(N / bs)
    causal = n * (n + 1) / 2
    st = pm.states
    return float((st != 0).float().sum(dim=(-1, -2)).mean()) / causal, float((st == 2).float().sum(dim=(-1, -2)).mean()) / causal


def run_shape(B, H, D, N, buckets, drops, baselines, plain, rows, modes=("fwd", "fwd+bwd")):
    torch.manual_seed(0)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    shape = dict(B=B, H=H, D=D, N=N)
    dense = {}
    if baselines:
        ops = {"sdpa_flash": sdpa_op(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa_op(SDPBackend.CUDNN_ATTENTION),
               "flex_dense": flex_dense_op(N, B, H)}
        for name, op in ops.items():
            fwd, fb = fwd_and_fwdbwd(op, q, k, v, do)
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                if mode not in modes:
                    continue
                try:
                    dense[(name, mode)] = time_ms(fn)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    console.print(f"[yellow]{name} {mode} failed: {type(e).__name__}: {str(e)[:200]}[/]")
                    dense[(name, mode)] = float("nan")
                rows.append(dict(**shape, pattern="dense", method=name, mode=mode, ms=dense[(name, mode)]))
                console.print(rows[-1])

    def record(pattern, param, pm, op, plain_op, build):
        frac, full = kept_block_fraction(pm, N)
        build_ms = time_ms(build)
        build_gpu_ms = graph_ms(build)
        for mode in modes:
            fwd, fb = fwd_and_fwdbwd(op, q, k, v, do)
            t = time_ms(fwd if mode == "fwd" else fb)
            row = dict(**shape, pattern=pattern, param=param, method="flexsparse", mode=mode, ms=t, slots=pm.length,
                       build_ms=build_ms, build_share=build_ms / t, build_gpu_ms=build_gpu_ms,
                       build_gpu_share=None if build_gpu_ms is None else build_gpu_ms / t, kept_blocks=round(frac, 4), full_blocks=round(full, 4))
            for (name, m), td in dense.items():
                if m == mode:
                    row[f"x_vs_{name}"] = td / t
            if mode == "fwd+bwd":
                row["peak_MiB"] = peak_mib(fb)
            if plain and plain_op is not None:
                pf, pfb = fwd_and_fwdbwd(plain_op, q, k, v, do)
                try:
                    row["plain_flex_ms"] = time_ms(pf if mode == "fwd" else pfb, target_ms=200)
                    row["x_vs_plain_flex"] = row["plain_flex_ms"] / t
                except Exception as e:  # noqa: BLE001
                    console.print(f"[yellow]plain flex failed: {type(e).__name__}: {str(e)[:200]}[/]")
            rows.append(row)
            console.print(row)

    for nb in buckets:
        qb = torch.randint(0, nb, (B, H, N), device="cuda", dtype=torch.int32)
        kb = torch.randint(0, nb, (B, H, N), device="cuda", dtype=torch.int32)
        # ids in [0, nb) as the HashSparseAttention module produces them: counting sort, aligned
        # buckets where cheap, no validation sync (the module's path)
        kw = {"n_buckets": nb, "validate": False}
        pm = flexsparse.hash_block_mask(qb, kb, **kw)

        def op(q, k, v, qb=qb, kb=kb):
            return flexsparse.hash_sparse_attention(q, k, v, qb, kb, backend="flex", **kw)

        record("hash", nb, pm, op, plain_flex_hash(qb, kb), lambda qb=qb, kb=kb: flexsparse.hash_block_mask(qb, kb, **kw))
    for rate in drops:
        qk = torch.rand(B, H, N, device="cuda") >= rate
        kk = torch.rand(B, H, N, device="cuda") >= rate
        # the QKSparseAttention module's path: capacity from the drop rate, checked on the device
        kw = {"capacity": capacity_for_rate(N, rate), "validate": False}
        pm = flexsparse.drop_block_mask(qk, kk, **kw)

        def op(q, k, v, qk=qk, kk=kk, kw=kw):
            return flexsparse.qk_sparse_attention(q, k, v, qk, kk, backend="flex", **kw)

        record("drop", rate, pm, op, plain_flex_drop(qk, kk), lambda qk=qk, kk=kk, kw=kw: flexsparse.drop_block_mask(qk, kk, **kw))
    dense.clear()
    gc.collect()
    torch.cuda.empty_cache()


def headline_inputs():
    """Random bf16 inputs of the headline shape (B=4 H=48 D=64 S=16k), 16 buckets, 80% drop."""
    B, H, D, N = 4, 48, 64, 16384
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    qb = torch.randint(0, 16, (B, H, N), device="cuda", dtype=torch.int32)
    kb = torch.randint(0, 16, (B, H, N), device="cuda", dtype=torch.int32)
    qk = torch.rand(B, H, N, device="cuda") >= 0.8
    kk = torch.rand(B, H, N, device="cuda") >= 0.8
    return (B, H, D, N), (q, k, v, do), (qb, kb), (qk, kk)


def profile_headline():
    """Where the time of one fwd+bwd goes (GPU kernels), headline shape."""
    from torch.profiler import ProfilerActivity, profile

    (B, H, D, N), (q, k, v, do), (qb, kb), (qk, kk) = headline_inputs()
    cases = {
        "hash16": lambda: flexsparse.hash_sparse_attention(q, k, v, qb, kb, backend="flex", n_buckets=16, validate=False),
        "drop0.8": lambda: flexsparse.qk_sparse_attention(
            q, k, v, qk, kk, backend="flex", capacity=capacity_for_rate(N, 0.8), validate=False),
    }
    for name, op in cases.items():
        for _ in range(2):
            torch.autograd.grad(op(), (q, k, v), do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(op(), (q, k, v), do)
            torch.cuda.synchronize()
        console.print(f"[bold]profile {name} (3 fwd+bwd)[/]")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


TUNE_VARIANTS = {
    "default": None,
    "tma": {"USE_TMA": True},
    "bwd64x64w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4},
    "fwd128x64w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8},
}


def tune_headline(rows):
    """FlexAttention kernel options on the headline shape, fwd+bwd end to end."""
    (B, H, D, N), (q, k, v, do), (qb, kb), (qk, kk) = headline_inputs()
    for name, opts in TUNE_VARIANTS.items():
        cases = {
            "hash16": lambda q, k, v: flexsparse.hash_sparse_attention(
                q, k, v, qb, kb, backend="flex", n_buckets=16, validate=False, kernel_options=opts),
            "drop0.8": lambda q, k, v: flexsparse.qk_sparse_attention(q, k, v, qk, kk, backend="flex", kernel_options=opts),
        }
        for case, op in cases.items():
            fwd, fb = fwd_and_fwdbwd(op, q, k, v, do)
            try:
                t_f, t_fb = time_ms(fwd), time_ms(fb)
            except Exception as e:  # noqa: BLE001
                console.print(f"[yellow]tune {name} {case} failed: {type(e).__name__}: {str(e)[:300]}[/]")
                continue
            rows.append({"B": B, "H": H, "D": D, "N": N, "pattern": "tune", "case": case, "variant": name,
                         "options": opts, "fwd_ms": t_f, "fwd+bwd_ms": t_fb})
            console.print(rows[-1])


def check_headline(rows):
    """The issue's targets, at B=4 H=48 D=64 S=16k fwd+bwd."""
    out = []
    for pattern, param, target in (("hash", 16, 4.0), ("drop", 0.8, 10.0), ("drop", 0.5, 3.0)):
        for r in rows:
            if (r.get("pattern"), r.get("param"), r.get("mode"), r.get("B"), r.get("H"), r.get("D"), r.get("N")) == (
                pattern, param, "fwd+bwd", 4, 48, 64, 16384
            ):
                x = r.get("x_vs_sdpa_cudnn", float("nan"))
                g = r.get("build_gpu_share")
                out.append(dict(target=f"{pattern} {param}: >= {target}x cuDNN fwd+bwd", speedup=round(x, 2),
                                met=bool(x >= target), build_share_wall=round(r["build_share"], 4),
                                build_share_gpu=None if g is None else round(g, 4),
                                build_share_gpu_met=None if g is None else bool(g <= 0.02)))
    return out


def table(rows, title):
    t = Table(title=title)
    for c in ("shape", "pattern", "mode", "ms", "x flash", "x cuDNN", "x flex dense", "x plain flex", "build ms", "build %", "build GPU %", "kept", "full", "peak MiB"):
        t.add_column(c)

    def f(x, p=2):
        return "" if x is None else f"{x:.{p}f}"

    for r in rows:
        if r["pattern"] in ("dense", "tune"):
            continue
        t.add_row(
            f"B{r['B']} H{r['H']} D{r['D']} N{r['N']}", f"{r['pattern']} {r['param']}", r["mode"], f(r["ms"], 3),
            f(r.get("x_vs_sdpa_flash")), f(r.get("x_vs_sdpa_cudnn")), f(r.get("x_vs_flex_dense")),
            f(r.get("x_vs_plain_flex")), f(r["build_ms"], 3), f(100 * r["build_share"], 1),
            f(None if r.get("build_gpu_share") is None else 100 * r["build_gpu_share"], 1), f(r["kept_blocks"], 3),
            f(r["full_blocks"], 3), f(r.get("peak_MiB"), 0),
        )
    console.print(t)


def warm_compile(args, shapes):
    """Compile every (shape, length) of the grid in parallel processes before timing: each static
    FlexAttention signature takes ~30 s to compile, and Inductor's on-disk cache makes the timed
    process's compiles cache hits."""
    import subprocess
    import time

    items = [(sh, n) for sh in shapes for n in (int(x) for x in args.seqs.split(",") if x)]
    t0 = time.time()
    procs, pending = [], list(items)
    while pending or procs:
        while pending and len(procs) < args.jobs:
            (B, H, D), n = pending.pop(0)
            cmd = [sys.executable, __file__, "--full", "--compile-only", "--shapes", f"{B},{H},{D}", "--seqs", str(n),
                   "--out", os.path.join(args.out, "compile_only")]
            if args.no_plain:
                cmd.append("--no-plain")
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), (B, H, D, n)))
        time.sleep(1.0)
        for p, what in list(procs):
            if p.poll() is not None:
                procs.remove((p, what))
                err = p.stderr.read().decode(errors="replace")[-400:] if p.returncode else ""
                console.print(f"compiled {what} rc={p.returncode} after {time.time() - t0:.0f} s {err}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--full", action="store_true", help="the whole grid of the issue, plus 128k")
    ap.add_argument("--shapes", default="4,48,64;1,16,128", help="B,H,D;... for --full")
    ap.add_argument("--seqs", default="4096,8192,16384,32768", help="for --full")
    ap.add_argument("--long", action="store_true", help="128k run (part of --full unless --shapes is given)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--profile", action="store_true", help="profile the headline fwd+bwd")
    ap.add_argument("--tune", action="store_true", help="try FlexAttention kernel options (headline shape)")
    ap.add_argument("--only-tune", action="store_true")
    ap.add_argument("--only-long", action="store_true")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain FlexAttention recipe")
    ap.add_argument("--compile-only", action="store_true", help="run every case once, time nothing (warms the caches)")
    ap.add_argument("--target-ms", type=float, default=400.0, help="measuring time per timed case")
    ap.add_argument("--warm-only", action="store_true", help="with --jobs: compile the grid, then stop")
    ap.add_argument("--jobs", type=int, default=0,
                    help="with --full: first compile the grid in this many parallel processes (one per shape and "
                         "length, sharing Inductor's on-disk cache), then time it here sequentially")
    args = ap.parse_args(argv)
    global COMPILE_ONLY, TARGET_MS
    COMPILE_ONLY = args.compile_only
    TARGET_MS = args.target_ms
    assert torch.cuda.is_available(), "GPU benchmark"
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                cudnn=torch.backends.cudnn.version(), flexsparse=flexsparse.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    console.print(meta)
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    name = f"scfa_{'full' if args.full else 'headline'}{args.tag}_" + gpu.replace(" ", "_").replace("/", "_") + ".json"

    def save():
        with open(os.path.join(args.out, name), "w") as fh:
            json.dump({"meta": meta, "targets": check_headline(rows), "rows": rows}, fh, indent=1)

    if args.profile:
        profile_headline()
    if args.tune or args.only_tune:
        tune_headline(rows)
    if args.only_tune or args.only_long:
        pass
    elif not args.full:
        run_shape(4, 48, 64, 16384, [16], [0.8, 0.5], True, not args.no_plain, rows)
    else:
        shapes = [tuple(int(x) for x in sh.split(",")) for sh in args.shapes.split(";") if sh]
        if args.jobs > 0 and not args.compile_only:
            warm_compile(args, shapes)
            if args.warm_only:
                return
        for (B, H, D) in shapes:
            for N in (int(x) for x in args.seqs.split(",") if x):
                run_shape(B, H, D, N, [4, 8, 16, 64], [0.3, 0.5, 0.8], True, not args.no_plain and N == 16384, rows)
                save()
    if not args.full and not args.only_tune and not args.only_long:
        save()
    if args.long or args.only_long:
        # 128k: runs, time, memory (no plain recipe: compiled create_block_mask is the slow part)
        run_shape(1, 16, 128, 131072, [16], [0.5, 0.8], True, False, rows, modes=("fwd+bwd",))
        save()
    table(rows, f"SCFA patterns on {gpu} (torch {torch.__version__}, triton {triton.__version__}), bf16, medians")
    head = check_headline(rows)
    for h in head:
        console.print(h)
    save()


if __name__ == "__main__":
    main()
