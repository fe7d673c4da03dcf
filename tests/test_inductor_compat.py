"""What Inductor does to our Triton kernels under ``torch.compile`` (``triton_op`` path), checked
on a CPU without a GPU. Each test pins a failure first seen on the H100:

* Inductor copies a kernel's module globals into its generated source as ``repr`` text, so a
  global ``tl.constexpr(float("inf"))`` became ``tl.constexpr(inf)``: NameError at compile time.
* Inductor passes Python float arguments of user kernels as fp64, so a float argument that
  meets a float32 loop-carried value changed the value's type: Triton compile error. The
  registered kernels (router, mask tables, fused DashAttention forward and backward) are
  compiled here for sm_90 with every float argument typed fp64.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import triton.language as tl

# modules whose kernels run inside registered torch.library ops (flexsparse/ops.py)
OP_KERNEL_MODULES = ("layout", "hash", "blockmask", "permute", "router", "dash_mask", "dash_attn")


@pytest.mark.parametrize("name", OP_KERNEL_MODULES + ("dash_decode",))
def test_kernel_module_constexpr_globals_survive_repr(name):
    mod = importlib.import_module(f"flexsparse.kernels.{name}")
    for key, val in vars(mod).items():
        if isinstance(val, tl.constexpr):
            text = repr(val.value)
            try:
                back = eval(text, {"__builtins__": {}})  # noqa: S307 - what Inductor's generated source does
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{name}.{key} = tl.constexpr({text}) does not survive Inductor's copy: {e!r}")
            assert back == val.value, (name, key, text)


_FP64_SCRIPT = r"""
import json
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flexsparse.kernels import router as R, dash_mask as M, dash_attn as A

PTR = {"q_ptr": "bf16", "kb_ptr": "bf16", "dq_ptr": "bf16", "states_ptr": "i8", "counts_ptr": "i32"}
# the fused DashAttention kernels: bf16 q/k/v/o, float32 dq and statistics
ATTN_PTR = {**{p: "bf16" for p in ("k_ptr", "v_ptr", "o_ptr", "do_ptr", "dk_ptr", "dv_ptr")},
            "dq_ptr": "fp32", "cnt_ptr": "i32", "ids_ptr": "i32", "flag_ptr": "i8", "qbl_ptr": "i32", "wid_ptr": "i32"}
ATTN = dict(BLOCK_G=4, BLOCK_R=16, BLOCK_N=64, BLOCK_D=128, DOT_PREC="tf32")
cases = [
    (R._tau_kernel, dict(MAX_ITER=40, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_PREC="tf32")),
    (R._pbar_kernel, dict(BLOCK_G=16, BLOCK_R=4, BLOCK_N=32, BLOCK_D=128, DOT_PREC="tf32")),
    (R._dq_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_PREC="tf32")),
    (R._dkbar_kernel, dict(BLOCK_G=16, BLOCK_R=4, BLOCK_N=32, BLOCK_D=128, DOT_PREC="tf32")),
    (M._dash_mask_kernel, dict(ACC=tl.float32, BLOCK_R=64, BLOCK_C=64, WITH_COUNTS=True, WITH_TABLE=True,
                              EST_DIAG=True, FILLER=-1.0e4, LIMIT=1.0e4)),
    (A._fwd_kernel, dict(ATTN, ESTIMATE=True, BLOCK_NC=32, ONE_SUB=False, MASK_K=True), ATTN_PTR),
    (A._bwd_dq_kernel, dict(ATTN, ESTIMATE=True, BLOCK_NC=32, ONE_SUB=False, LIST_WALK=True), ATTN_PTR),
    (A._bwd_dkdv_kernel, dict(ATTN, ESTIMATE=True, FLAG_T=64, LIST_WALK=True), ATTN_PTR),
]
FLOATS = {"xs", "zscale", "inv_g", "inv_sigma", "qk2", "scale"}
out = []
for fn, consts, *ptr in cases:
    ptr = {**PTR, **ptr[0]} if ptr else PTR
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*" + ptr.get(a, "fp32")
        else:
            sig[a] = "fp64" if a in FLOATS else "i32"
    assert any(v == "fp64" for v in sig.values()), fn
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 2})
    # the fp64 arguments are cast once: no tile is computed in fp64 (eager runs them in fp32)
    assert "xf64>" not in k.asm["ttir"], (fn.fn.__name__, "computes tiles in fp64")
    out.append(fn.fn.__name__)
print(json.dumps(out))
"""


@pytest.mark.triton
def test_registered_kernels_compile_with_fp64_float_arguments():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FP64_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 8


# Inside a triton_op, Inductor functionalises the kernels' writes. Writes into views (slices of
# one scratch allocation, a dtype view of a byte buffer) were replayed onto the wrong base on the
# H100: an illegal memory access in compiled hash training (layout scratch) and wrong backward
# block lists, hence wrong gradients (the BlockMask workspace). So every tensor an op body hands
# to a kernel is either (a view of) one of the op's inputs or a whole allocation of its own, and
# no allocation of its own goes to one launch twice: an output also passed as the stand-in for an
# unused pointer came back unwritten in compiled DashAttention on the H100 (wrong block states,
# NaN outputs), although eager and AOTAutograd without Inductor were right.

OP_NAMES = ("sorted_layout", "block_stats", "sorted_block_states", "scatter_block_lists", "compact_block_states",
            "gather_rows", "router_tau", "router_pbar", "router_backward", "dash_mask_tables", "dash_attn_forward",
            "dash_attn_backward")


@pytest.mark.triton
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_bodies_pass_kernels_whole_allocations(name, monkeypatch):
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records kernel launches through the Triton interpreter")
    from test_compile import _op_samples

    seen = []
    run = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        seen.append((getattr(self.fn, "__name__", "?"), [a for a in args if isinstance(a, torch.Tensor)]))
        return run(self, *args, **kwargs)

    samples = _op_samples("cpu")[name]
    monkeypatch.setattr(InterpretedFunction, "run", spy)
    for args in samples:
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        seen.clear()
        outs = getattr(torch.ops.flexsparse, name)(*args)
        assert seen, f"{name}: no kernel launched"
        for t in outs if isinstance(outs, (tuple, list)) else (outs,):
            whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
            assert t._base is None and t.storage_offset() == 0 and whole, (
                f"{name}: returns a view {tuple(t.shape)} {t.dtype} of a larger allocation"
            )
        for kernel, tensors in seen:
            made = [t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().data_ptr() not in inputs]
            assert len(made) == len(set(made)), (
                f"{name}: {kernel} got one allocation made inside the op as two arguments (a stand-in for an "
                "unused pointer): functionalisation clones each argument apart and may hand back the unwritten copy"
            )
            for t in tensors:
                if t.untyped_storage().data_ptr() in inputs:
                    continue
                whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
                assert t._base is None and t.storage_offset() == 0 and whole, (
                    f"{name}: {kernel} got a view {tuple(t.shape)} {t.dtype} (offset {t.storage_offset()}) "
                    "of an allocation made inside the op"
                )
