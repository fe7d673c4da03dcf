"""Command line: ``python -m flexsparse {demo,info}`` (also installed as ``flexsparse``).

``info`` prints versions, the device, and which backends are usable here (and why not).
``demo`` builds each available sparse pattern on a random input, draws its block mask in the
terminal, and reports its kept fraction, its error against the dense float64 reference, and how
long building the ``BlockMask`` (and, on a GPU, the FlexAttention forward) takes.

Patterns register themselves in :data:`PATTERNS`; adding one is adding a :class:`PatternEntry`
whose ``setup`` returns a :class:`PatternRun`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import Any

import torch

import flexsparse

__all__ = ["main", "run_demo", "info_report", "PATTERNS", "PatternEntry", "PatternRun", "DemoContext"]

# Block states, as in flexsparse.patterns.blockmask (kept here so `info` needs no kernel import).
EMPTY, PARTIAL, FULL = 0, 1, 2

_TRUTHY = {"1", "true", "yes", "on"}


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def _cuda() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module)
        except Exception:  # noqa: BLE001
            version = "installed"
    return str(version)


def _device_line() -> str:
    if _cuda():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"CUDA: {torch.cuda.get_device_name(idx)} (sm_{major}{minor}), {torch.cuda.device_count()} GPU(s)"
    cpu = platform.processor() or platform.machine()
    return f"CPU only: {cpu}, {os.cpu_count()} cores (no CUDA GPU visible to torch)"


def _backends() -> list[dict[str, Any]]:
    """Each backend: name, status ("yes" / "partial" / "no") and why."""
    out: list[dict[str, Any]] = []
    cuda = _cuda()

    triton_version = _version_of("triton")
    if triton_version is None:
        out.append(dict(name="triton kernels", status="no", why="triton is not importable"))
    elif cuda:
        out.append(dict(name="triton kernels", status="yes", why=f"CUDA GPU present (triton {triton_version})"))
    elif _interpreter_on():
        out.append(
            dict(
                name="triton kernels",
                status="partial",
                why="no GPU, but TRITON_INTERPRET=1: kernels run in the Triton interpreter "
                "(correct, slow; use float32/float16, the interpreter mishandles bfloat16)",
            )
        )
    else:
        out.append(
            dict(
                name="triton kernels",
                status="no",
                why="no CUDA GPU and TRITON_INTERPRET is unset; set TRITON_INTERPRET=1 before "
                "importing flexsparse to run them in the interpreter (the demo and the tests do this)",
            )
        )

    try:
        importlib.import_module("torch.nn.attention.flex_attention")
        has_flex = True
    except Exception as exc:  # noqa: BLE001
        has_flex = False
        flex_err = f"torch {torch.__version__} has no FlexAttention ({exc.__class__.__name__})"
    if not has_flex:
        out.append(dict(name="flex (compiled FlexAttention)", status="no", why=flex_err))
    elif cuda:
        major, _ = torch.cuda.get_device_capability()
        why = "torch.compile(flex_attention) on the GPU: forward and backward"
        if major < 8:
            why += " (untested below sm_80)"
        out.append(dict(name="flex (compiled FlexAttention)", status="yes", why=why))
    else:
        out.append(
            dict(
                name="flex (compiled FlexAttention)",
                status="partial",
                why="CPU: inference only (inputs that require grad raise); compiling costs ~25 s per "
                "new shape; training on CPU goes through flexsparse.reference",
            )
        )

    try:
        importlib.import_module("flexsparse.reference")
        out.append(
            dict(
                name="reference (dense PyTorch)",
                status="yes",
                why="always: any device, autograd, float64; O(N^2) memory, for tests and small inputs",
            )
        )
    except Exception as exc:  # noqa: BLE001
        out.append(dict(name="reference (dense PyTorch)", status="no", why=f"import failed: {exc}"))

    if hasattr(flexsparse, "block_mask_from_states") and hasattr(flexsparse, "build_block_mask"):
        how = (
            "with the Triton kernels"
            if out[0]["status"] != "no"
            else "with its pure-PyTorch path (impl='torch'), as the Triton kernels cannot run here"
        )
        why = f"flexsparse.build_block_mask / block_mask_from_states, {how}"
        out.append(dict(name="BlockMask builder", status="yes", why=why))
    else:
        out.append(dict(name="BlockMask builder", status="no", why="not in this build of flexsparse"))

    entmax_version = _version_of("entmax")
    if entmax_version is None:
        why = "`entmax` is not importable (pip install entmax); the DashAttention cross-checks need it"
        out.append(dict(name="entmax", status="no", why=why))
    else:
        why = f"entmax {entmax_version}: an independent 1.5-entmax the DashAttention router is checked against"
        out.append(dict(name="entmax", status="yes", why=why))
    return out


def info_report() -> dict[str, Any]:
    """Everything ``python -m flexsparse info`` shows, as a dict."""
    return {
        "versions": {
            "flexsparse": flexsparse.__version__,
            "torch": torch.__version__,
            "triton": _version_of("triton") or "not installed",
            "python": platform.python_version(),
            "entmax": _version_of("entmax") or "not installed",
            "numpy": _version_of("numpy") or "not installed",
            "rich": _version_of("rich") or "not installed",
        },
        "platform": platform.platform(),
        "device": _device_line(),
        "cuda": _cuda(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "backends": _backends(),
        "demo_patterns": [p.name for p in PATTERNS],
    }


def _print_info(report: dict[str, Any], console) -> None:
    from rich.table import Table

    versions = Table(title="flexsparse info", show_header=False, title_justify="left")
    versions.add_column(style="bold")
    versions.add_column()
    for name, ver in report["versions"].items():
        versions.add_row(name, ver)
    versions.add_row("platform", report["platform"])
    versions.add_row("device", report["device"])
    versions.add_row("TRITON_INTERPRET", report["TRITON_INTERPRET"] or "(unset)")
    versions.add_row("demo patterns", ", ".join(report["demo_patterns"]) or "(none)")
    console.print(versions)

    backends = Table(title="backends", title_justify="left")
    backends.add_column("backend", style="bold")
    backends.add_column("usable")
    backends.add_column("why / why not")
    marks = {"yes": "[green]yes[/]", "partial": "[yellow]partly[/]", "no": "[red]no[/]"}
    for b in report["backends"]:
        backends.add_row(b["name"], marks[b["status"]], b["why"])
    console.print(backends)


# --------------------------------------------------------------------------------------------
# demo: pattern registry
# --------------------------------------------------------------------------------------------


@dataclass
class DemoContext:
    """What every pattern's ``setup`` receives: the random input and the demo settings."""

    q: torch.Tensor  # [B, H, N, D]
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    density: float
    generator: torch.Generator
    flex: Callable[..., torch.Tensor]  # flex_attention, compiled on the GPU
    compiled: bool = False

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]


@dataclass
class PatternRun:
    """One pattern instance, built on a :class:`DemoContext`.

    ``build`` rebuilds the BlockMask from the same inputs (it is what gets timed); ``forward``
    runs the fast path on the context's q, k, v and returns ``[B, H, N, D]`` in original token
    order; ``reference(rows)`` returns the float64 dense reference output for those query rows
    (``[B, H, len(rows), D]``) and ``baseline(rows)`` the same computed by plain PyTorch at the
    input's precision (the yardstick of the tolerance rule).
    """

    block_mask: Any
    build: Callable[[], Any]
    forward: Callable[[], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]
    baseline: Callable[[torch.Tensor], torch.Tensor]
    expected_states: torch.Tensor | None = None  # what block_states(block_mask) must give back
    note: str = ""
    kept_fraction: float | None = None  # for masks in sorted coordinates: kept / causal blocks at N


@dataclass
class PatternEntry:
    name: str
    summary: str
    setup: Callable[[DemoContext], PatternRun]
    extra: dict[str, Any] = field(default_factory=dict)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def random_block_states(
    B: int, H: int, N: int, block_size: int, density: float, *, generator: torch.Generator, device
) -> torch.Tensor:
    """A causal random block pattern, int8 ``[B, H, n, n]`` with ``n = ceil(N / block_size)``.

    Diagonal blocks are always kept and PARTIAL (the causal element mask decides inside them);
    strictly-lower blocks are FULL with a probability chosen so that the expected share of kept
    causal blocks is ``density`` (never below the diagonal alone); everything else is EMPTY.
    """
    n = _cdiv(N, block_size)
    causal = n * (n + 1) // 2
    below = causal - n
    p = 0.0 if below == 0 else min(1.0, max(0.0, (density * causal - n) / below))
    r = torch.rand(B, H, n, n, generator=generator, device=device)
    strict = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
    states = torch.zeros(B, H, n, n, dtype=torch.int8, device=device)
    states[(r < p) & strict] = FULL
    torch.diagonal(states, dim1=-2, dim2=-1).fill_(PARTIAL)
    return states


def element_mask_rows(states: torch.Tensor, rows: torch.Tensor, N: int, block_size: int) -> torch.Tensor:
    """Dense bool mask ``[B, H, len(rows), N]`` of a causal block-state map, written directly.

    An independent oracle: FULL blocks keep everything, PARTIAL blocks keep ``q >= kv``.
    """
    s = states[:, :, rows // block_size, :].repeat_interleave(block_size, dim=-1)[..., :N]
    causal = rows[:, None] >= torch.arange(N, device=rows.device)[None, :]
    return (s == FULL) | ((s == PARTIAL) & causal)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _setup_random_blocks(ctx: DemoContext) -> PatternRun:
    from flexsparse import reference

    q, k, v = ctx.q, ctx.k, ctx.v
    B, H, N, _ = q.shape
    bs = ctx.block_size
    states = random_block_states(B, H, N, bs, ctx.density, generator=ctx.generator, device=ctx.device)
    mask_mod = flexsparse.states_mask_mod(states, bs, element_mod=_causal)

    def build():
        return flexsparse.block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=mask_mod)

    bm = build()

    def forward():
        return ctx.flex(q, k, v, block_mask=bm)

    def ref(rows):
        mask = element_mask_rows(states, rows, N, bs)
        return reference.attention(q[:, :, rows].double(), k.double(), v.double(), mask=mask)

    def base(rows):
        mask = element_mask_rows(states, rows, N, bs)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask)

    return PatternRun(
        block_mask=bm,
        build=build,
        forward=forward,
        reference=ref,
        baseline=base,
        expected_states=states,
        note="diagonal blocks partial (causal mask_mod), kept off-diagonal blocks full",
    )


def _masked_rows_runs(ctx: DemoContext, pm, mask_rows: Callable[[torch.Tensor], torch.Tensor], note: str) -> PatternRun:
    """A :class:`PatternRun` for a permuted pattern (``pm`` a PermutedBlockMask) whose dense mask
    for a set of query rows is ``mask_rows(rows) -> [B, H, len(rows), N]``."""
    from flexsparse import reference

    q, k, v = ctx.q, ctx.k, ctx.v
    B, H, N, _ = q.shape

    def forward():
        out = ctx.flex(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=pm.block_mask)
        return pm.unpermute_q(out)

    def ref(rows):
        return reference.attention(q[:, :, rows].double(), k.double(), v.double(), mask=mask_rows(rows))

    def base(rows):  # SDPA at the input precision; rows with no allowed key are 0, as in the op
        mask = mask_rows(rows)
        out = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask)
        return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))

    n = _cdiv(N, ctx.block_size)
    kept = (pm.states != EMPTY).sum().item() / (B * H * n * (n + 1) // 2)
    return PatternRun(
        block_mask=pm.block_mask, build=None, forward=forward, reference=ref, baseline=base,
        expected_states=pm.states, note=note, kept_fraction=kept,
    )


def _setup_hash(ctx: DemoContext) -> PatternRun:
    B, H, N, _ = ctx.q.shape
    nb = 16
    qb = torch.randint(0, nb, (B, H, N), generator=ctx.generator, device=ctx.device, dtype=torch.int32)
    kb = torch.randint(0, nb, (B, H, N), generator=ctx.generator, device=ctx.device, dtype=torch.int32)

    def build():
        return flexsparse.hash_block_mask(qb, kb, n_buckets=nb, block_size=ctx.block_size, validate=False)

    pm = build()

    def mask_rows(rows):
        causal = rows[:, None] >= torch.arange(N, device=rows.device)[None, :]
        return (qb[:, :, rows, None] == kb[:, :, None, :]) & causal

    run = _masked_rows_runs(
        ctx, pm, mask_rows,
        f"{nb} random buckets; picture in sorted order ({pm.length} slots: buckets start on block boundaries)"
        if pm.length != N else f"{nb} random buckets; picture in sorted order",
    )
    run.build = build
    return run


def _setup_drop(ctx: DemoContext) -> PatternRun:
    from flexsparse.patterns.drop import capacity_for_rate

    B, H, N, _ = ctx.q.shape
    rate = 0.8
    qk = torch.rand(B, H, N, generator=ctx.generator, device=ctx.device) >= rate
    kk = torch.rand(B, H, N, generator=ctx.generator, device=ctx.device) >= rate
    cap = capacity_for_rate(N, rate, ctx.block_size)

    def build():
        return flexsparse.drop_block_mask(qk, kk, block_size=ctx.block_size, capacity=cap, validate=False)

    pm = build()

    def mask_rows(rows):
        causal = rows[:, None] >= torch.arange(N, device=rows.device)[None, :]
        return qk[:, :, rows, None] & kk[:, :, None, :] & causal

    run = _masked_rows_runs(ctx, pm, mask_rows, f"{rate:.0%} of queries and keys dropped; compacted to {cap} slots")
    run.build = build
    return run


def _setup_dash(ctx: DemoContext) -> PatternRun:
    from flexsparse import reference
    from flexsparse.patterns.dash import dash_block_mask

    B, H, N, D = ctx.q.shape
    C = ctx.block_size  # one chunk per KV block; square block picture
    gamma = 8.0
    q, k, v = ctx.q, ctx.k, ctx.v
    w = (0.5 * torch.randn(H, D, generator=ctx.generator, device=ctx.device)).to(q.dtype)

    def build():
        kbar = reference.chunk_summaries(k, w, C)
        p = flexsparse.entmax_router(q, kbar, chunk_size=C, gamma=gamma)
        return dash_block_mask(p, N, chunk_size=C, groups=1, q_block=C)

    dm = build()

    def forward():
        return flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, q_block=C, backend="flex")

    def dense_rows(rows, dt):
        pbar = reference.dash_router(q.to(dt), k.to(dt), w.to(dt), chunk_size=C, gamma=gamma)
        lp = reference.dash_log_prior(pbar, N, chunk_size=C)[:, :, rows]  # [B, H, R, nC]
        bias = lp.index_select(-1, torch.arange(N, device=q.device) // C)  # [B, H, R, N]
        mask = (rows[:, None] >= torch.arange(N, device=q.device)[None, :]) & (bias > float("-inf"))
        return mask, torch.where(mask, bias, 0.0)

    def ref(rows):
        mask, bias = dense_rows(rows, torch.float64)
        return reference.attention(q[:, :, rows].double(), k.double(), v.double(), mask=mask, bias=bias)

    def base(rows):  # plain PyTorch at the input precision
        mask, bias = dense_rows(rows, q.dtype)
        attn = torch.where(mask, bias, float("-inf")).to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=attn)

    kept, sparsity = dm.sparsity()
    return PatternRun(
        block_mask=dm.block_mask, build=build, forward=forward, reference=ref, baseline=base,
        expected_states=dm.states, kept_fraction=float(kept),
        note=f"entmax router, gamma={gamma}, chunks of {C}: {float(kept):.0%} of causal chunks kept per query, "
        f"paper sparsity {float(sparsity):.0%}; the picture shows blocks any query of the block selected",
    )


#: The demo's patterns, in display order.
PATTERNS: list[PatternEntry] = [
    PatternEntry(
        name="random-blocks",
        summary="causal random blocks at --density (the BlockMask builder on its own)",
        setup=_setup_random_blocks,
    ),
    PatternEntry(
        name="hash",
        summary="hash-sparse (SCFA): same bucket and causal; 16 buckets, sorted by bucket",
        setup=_setup_hash,
    ),
    PatternEntry(
        name="drop",
        summary="query/key drop (SCFA): 80% of queries and keys dropped, the rest compacted",
        setup=_setup_drop,
    ),
    PatternEntry(
        name="dash",
        summary="DashAttention: 1.5-entmax router over chunk summaries, its probabilities as a prior",
        setup=_setup_dash,
    ),
]


# --------------------------------------------------------------------------------------------
# demo: running
# --------------------------------------------------------------------------------------------


def _ensure_interpreter(cli: bool) -> None:
    """On a CPU-only machine, make Triton kernels run in the interpreter.

    ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it must be set
    before flexsparse's kernel modules are imported. If they already were (without it), a CLI
    invocation re-executes itself with the variable set; a library call raises.
    """
    if _cuda() or _interpreter_on():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if not _compiled_kernels_loaded():
        return
    if cli and not os.environ.get("_FLEXSPARSE_REEXEC"):
        env = dict(os.environ, _FLEXSPARSE_REEXEC="1")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "flexsparse", *sys.argv[1:]], env)
    del os.environ["TRITON_INTERPRET"]
    raise RuntimeError(
        "flexsparse's Triton kernels were imported before TRITON_INTERPRET=1 was set and there is "
        "no CUDA GPU; set TRITON_INTERPRET=1 in the environment before importing flexsparse"
    )


def _compiled_kernels_loaded() -> bool:
    """True if a flexsparse module already defined a (non-interpreted) ``@triton.jit`` kernel."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001 - no triton, nothing was defined with it
        return False
    for name, mod in list(sys.modules.items()):
        if name.startswith("flexsparse.") and mod is not None:
            if any(isinstance(obj, JITFunction) for obj in vars(mod).values()):
                return True
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], Any], device: torch.device, *, repeats: int = 5, budget_s: float = 5.0) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _check_rows(N: int, max_rows: int | None, device, generator: torch.Generator) -> torch.Tensor:
    """Query rows the error is measured on: all of them, or a sample including the first and last."""
    if max_rows is not None:
        max_rows = max(2, max_rows)
    if max_rows is None or N <= max_rows:
        return torch.arange(N, device=device)
    inner = torch.randperm(N - 2, generator=generator, device=device)[: max(0, max_rows - 2)] + 1
    ends = torch.tensor([0, N - 1], device=device)
    return torch.sort(torch.cat([ends, inner])).values


def _kept_fraction(states: torch.Tensor) -> float:
    """Kept blocks / causal blocks, over all (batch, head)."""
    n_q, n_kv = states.shape[-2:]
    causal = torch.ones(n_q, n_kv, dtype=torch.bool, device=states.device).tril(n_kv - n_q)
    kept = ((states != EMPTY) & causal).sum().item()
    return kept / (causal.sum().item() * states.shape[0] * states.shape[1])


def run_demo(
    *,
    seq_len: int | None = None,
    heads: int | None = None,
    batch: int | None = None,
    head_dim: int = 64,
    block_size: int | None = None,
    density: float = 0.25,
    device: str | None = None,
    compile: bool | None = None,
    check_rows: int | None = None,
    seed: int = 0,
    patterns: Sequence[str] | None = None,
    console=None,
    cli: bool = False,
) -> dict[str, Any]:
    """Run the demo and return its numbers; draws to ``console`` (a rich Console) when given.

    Defaults depend on the device: on a GPU 2 x 16 heads x 16384 tokens, blocks of 128, bfloat16,
    compiled FlexAttention; on the CPU 1 x 4 heads x 1024 tokens, blocks of 64, float32, eager
    FlexAttention and the Triton builder under ``TRITON_INTERPRET=1``.
    """
    dev = torch.device(device or ("cuda" if _cuda() else "cpu"))
    gpu = dev.type == "cuda"
    if not gpu:
        _ensure_interpreter(cli)

    seq_len = seq_len or (16384 if gpu else 1024)
    heads = heads or (16 if gpu else 4)
    batch = batch or (2 if gpu else 1)
    block_size = block_size or (128 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    compile = gpu if compile is None else compile
    if check_rows is None:
        check_rows = 256 if gpu else 2048
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if seq_len < 1 or heads < 1 or batch < 1 or block_size < 1:
        raise ValueError("seq-len, heads, batch and block-size must be positive")

    entries = PATTERNS
    if patterns:
        known = {p.name for p in PATTERNS}
        unknown = [p for p in patterns if p not in known]
        if unknown:
            raise ValueError(f"unknown pattern(s) {unknown}; available: {sorted(known)}")
        entries = [p for p in PATTERNS if p.name in patterns]

    from torch.nn.attention.flex_attention import flex_attention

    from flexsparse.testing import FLOOR, max_abs_err

    flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype) for _ in range(3))
    ctx = DemoContext(q=q, k=k, v=v, block_size=block_size, density=density, generator=gen, flex=flex, compiled=compile)

    config = dict(
        device=_device_line(),
        batch=batch,
        heads=heads,
        seq_len=seq_len,
        head_dim=head_dim,
        block_size=block_size,
        density=density,
        dtype=str(dtype).replace("torch.", ""),
        flex="compiled" if compile else "eager",
        triton_interpret=_interpreter_on(),
        builder="triton" if gpu else ("triton (interpreter)" if _interpreter_on() else "torch"),
        seed=seed,
    )
    if console is not None:
        _print_header(console, config)

    results = []
    for entry in entries:
        with warnings.catch_warnings():
            # eager FlexAttention warns that it is unfused; we know, and say so below.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            res = _run_pattern(entry, ctx, dev, dtype, check_rows, FLOOR, max_abs_err, console)
        results.append(res)

    if gpu:
        dense_ms = _time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), dev
        )
    else:
        dense_ms = None
    report = dict(config=config, patterns=results, dense_causal_sdpa_ms=dense_ms, ok=all(r["ok"] for r in results))
    if console is not None:
        _print_summary(console, report)
    return report


def _run_pattern(entry, ctx, dev, dtype, check_rows, FLOOR, max_abs_err, console) -> dict[str, Any]:
    N = ctx.seq_len
    t0 = time.perf_counter()
    run = entry.setup(ctx)
    _sync(dev)
    first_build_s = time.perf_counter() - t0

    states = flexsparse.block_states(run.block_mask)
    roundtrip = None
    if run.expected_states is not None:
        roundtrip = bool(torch.equal(states.to(run.expected_states.device), run.expected_states))
    kept = _kept_fraction(states) if run.kept_fraction is None else run.kept_fraction

    build_ms = _time_ms(run.build, dev)

    out = run.forward()
    _sync(dev)
    rows = _check_rows(N, check_rows, dev, ctx.generator)
    ref = run.reference(rows)
    base = run.baseline(rows)
    err = max_abs_err(out[:, :, rows], ref)
    base_err = max_abs_err(base, ref)
    bound = 2.0 * base_err + FLOOR[dtype]
    flex_ms = _time_ms(run.forward, dev) if ctx.compiled else None  # eager timings mean little
    del ref, base, out

    ok = (err == err) and err <= bound and roundtrip is not False
    res = dict(
        name=entry.name,
        kept_fraction=kept,
        max_abs_err=err,
        baseline_err=base_err,
        bound=bound,
        rows_checked=int(rows.numel()),
        build_ms=build_ms,
        first_build_s=first_build_s,
        flex_fwd_ms=flex_ms,
        states_roundtrip=roundtrip,
        ok=bool(ok),
    )
    if console is not None:
        _print_pattern(console, entry, run, states, res, ctx)
    # One machine-readable line per pattern (also what tests grep for).
    line = (
        f"RESULT pattern={entry.name} kept={kept:.4f} max_abs_err={err:.3e} bound={bound:.3e} "
        f"build_ms={build_ms:.3f} ok={int(ok)}"
    )
    if console is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return res


# --------------------------------------------------------------------------------------------
# demo: drawing
# --------------------------------------------------------------------------------------------

_GLYPHS = {EMPTY: ("·", "grey42"), PARTIAL: ("▒", "yellow"), FULL: ("█", "green")}


def downsample_states(states2d: torch.Tensor, max_cells: int = 64) -> tuple[torch.Tensor, int]:
    """Max-pool an int8 ``[nQ, nKV]`` block map to at most ``max_cells`` per side.

    Returns the pooled map and the pooling factor (blocks per cell side).
    """
    nq, nkv = states2d.shape
    f = max(1, _cdiv(max(nq, nkv), max_cells))
    if f == 1:
        return states2d.clone(), 1
    rq, rk = _cdiv(nq, f) * f, _cdiv(nkv, f) * f
    pad = torch.full((rq, rk), -1, dtype=states2d.dtype, device=states2d.device)
    pad[:nq, :nkv] = states2d
    pooled = pad.view(rq // f, f, rk // f, f).amax(dim=(1, 3))
    return pooled.clamp_min(EMPTY), f


def render_states(states2d: torch.Tensor, *, max_cells: int = 64, cell_width: int = 1):
    """A rich ``Text`` picture of one head's block map (one glyph per cell)."""
    from rich.text import Text

    pooled, f = downsample_states(states2d.cpu(), max_cells)
    text = Text()
    for i, row in enumerate(pooled.tolist()):
        if i:
            text.append("\n")
        for s in row:
            glyph, style = _GLYPHS.get(int(s), ("?", "red"))
            text.append(glyph * cell_width, style=style)
    return text, f


def _print_header(console, config) -> None:
    from rich.panel import Panel

    c = config
    console.print(
        Panel.fit(
            f"[bold]flexsparse demo[/]  {c['device']}\n"
            f"q, k, v: {c['batch']} x {c['heads']} heads x {c['seq_len']} tokens x {c['head_dim']} "
            f"({c['dtype']}), blocks of {c['block_size']}, density {c['density']:.2f}\n"
            f"BlockMask builder: {c['builder']}   FlexAttention: {c['flex']}"
        )
    )
    if c["flex"] == "eager":
        console.print(
            "[dim]eager FlexAttention applies only the exact mask_mod (it ignores the block lists); "
            "pass --compile to run the fused kernel through them.[/]"
        )


def _print_pattern(console, entry, run, states, res, ctx) -> None:
    from rich.panel import Panel
    from rich.table import Table

    nq, nkv = states.shape[-2:]
    max_cells = 64
    width = min(max_cells, nkv)
    cell_width = 2 if 2 * width + 6 <= console.width else 1
    picture, f = render_states(states[0, 0], max_cells=max_cells, cell_width=cell_width)
    cell = f"{f}x{f} blocks" if f > 1 else "1 block"
    caption = (
        f"batch 0, head 0: {nq} x {nkv} blocks of {ctx.block_size} tokens, one cell = {cell} (max)\n"
        "[green]█[/] full   [yellow]▒[/] partial (mask_mod)   [grey42]·[/] empty"
    )
    console.rule(f"[bold]{entry.name}[/]", align="left")
    console.print(entry.summary)
    console.print(Panel(picture, expand=False, padding=(0, 1)))
    console.print(caption)

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("kept fraction of causal blocks", f"{res['kept_fraction']:.1%}")
    verdict = "[green]ok[/]" if res["ok"] else "[red]TOO LARGE[/]"
    t.add_row(
        "max |flex - reference(float64)|",
        f"{res['max_abs_err']:.2e}  (bound {res['bound']:.2e} = 2 x plain-PyTorch error "
        f"{res['baseline_err']:.2e} + floor; {res['rows_checked']} query rows)  {verdict}",
    )
    if res["states_roundtrip"] is not None:
        t.add_row("block states round trip", "[green]exact[/]" if res["states_roundtrip"] else "[red]MISMATCH[/]")
    t.add_row("BlockMask build (median)", f"{res['build_ms']:.3f} ms")
    if res["flex_fwd_ms"] is not None:
        t.add_row("flex_attention forward (median)", f"{res['flex_fwd_ms']:.3f} ms")
    if run.note:
        t.add_row("note", run.note)
    console.print(t)
    console.print()


def _print_summary(console, report) -> None:
    from rich.table import Table

    t = Table(title="summary", title_justify="left")
    for col in ("pattern", "kept", "max err", "bound", "build ms", "flex fwd ms", "ok"):
        t.add_column(col, justify="right" if col not in ("pattern", "ok") else "left")
    for r in report["patterns"]:
        t.add_row(
            r["name"],
            f"{r['kept_fraction']:.1%}",
            f"{r['max_abs_err']:.2e}",
            f"{r['bound']:.2e}",
            f"{r['build_ms']:.3f}",
            "-" if r["flex_fwd_ms"] is None else f"{r['flex_fwd_ms']:.3f}",
            "[green]yes[/]" if r["ok"] else "[red]NO[/]",
        )
    console.print(t)
    if report["dense_causal_sdpa_ms"] is not None:
        console.print(f"dense causal SDPA forward, same inputs: {report['dense_causal_sdpa_ms']:.3f} ms")


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flexsparse",
        description="flexsparse: dynamic sparse causal attention on FlexAttention and Triton.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,info}")

    p_info = sub.add_parser("info", help="versions, device and usable backends")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    p_demo = sub.add_parser(
        "demo",
        help="build each pattern's BlockMask on random input; show it, its error and its time",
        description="Uses the GPU when present (bf16, compiled FlexAttention), else the CPU "
        "(float32, eager FlexAttention, Triton interpreter).",
    )
    p_demo.add_argument("--seq-len", type=int, default=None, help="tokens (default 16384 on GPU, 1024 on CPU)")
    p_demo.add_argument("--heads", type=int, default=None, help="heads (default 16 on GPU, 4 on CPU)")
    p_demo.add_argument("--batch", type=int, default=None, help="batch size (default 2 on GPU, 1 on CPU)")
    p_demo.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    p_demo.add_argument("--block-size", type=int, default=None, help="block size (default 128 on GPU, 64 on CPU)")
    p_demo.add_argument("--density", type=float, default=0.25, help="target kept fraction of causal blocks")
    p_demo.add_argument("--device", default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    p_demo.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile flex_attention (default: on GPU yes, on CPU no: ~25 s per shape there)",
    )
    p_demo.add_argument(
        "--check-rows",
        type=int,
        default=None,
        help="query rows compared with the reference (default 256 on GPU, 2048 on CPU)",
    )
    p_demo.add_argument("--pattern", action="append", default=None, help="run only this pattern (repeatable)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--json", action="store_true", help="print the numbers as JSON instead of pictures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m flexsparse`` and the ``flexsparse`` console script."""
    cli = argv is None
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))

    if args.command is None:
        parser.print_help()
        return 0
    # rich is imported only for pictures and tables, so `--json` also works where it is missing.
    console = None
    if not args.json:
        from rich.console import Console

        console = Console()

    if args.command == "info":
        report = info_report()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_info(report, console)
        return 0

    if args.command == "demo":
        try:
            report = run_demo(
                seq_len=args.seq_len,
                heads=args.heads,
                batch=args.batch,
                head_dim=args.head_dim,
                block_size=args.block_size,
                density=args.density,
                device=args.device,
                compile=args.compile,
                check_rows=args.check_rows,
                seed=args.seed,
                patterns=args.pattern,
                console=console,
                cli=cli,
            )
        except ValueError as exc:
            parser.error(str(exc))
        if args.json:
            print(json.dumps(report, indent=2, default=_jsonable))
        return 0 if report["ok"] else 1

    parser.error(f"unknown command {args.command!r}")
    return 2


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
