"""The command line: ``python -m flexsparse info`` and ``python -m flexsparse demo``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexsparse
from flexsparse.__main__ import (
    EMPTY,
    FULL,
    PARTIAL,
    downsample_states,
    info_report,
    main,
    random_block_states,
    render_states,
    run_demo,
)

REPO = Path(__file__).resolve().parents[1]


def test_info_names_every_backend(capsys):
    pytest.importorskip("rich")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton kernels", "flex (compiled FlexAttention)", "reference", "entmax", flexsparse.__version__):
        assert name in out, f"{name!r} missing from `info` output"

    report = info_report()
    status = {b["name"]: b["status"] for b in report["backends"]}
    assert status["reference (dense PyTorch)"] == "yes"
    assert status["BlockMask builder"] == "yes"
    if torch.cuda.is_available():
        assert status["triton kernels"] == "yes"
    else:
        # conftest sets TRITON_INTERPRET=1 without a GPU; compiled flex is inference-only on CPU
        assert status["triton kernels"] == "partial"
        assert status["flex (compiled FlexAttention)"] == "partial"
    assert all(b["why"] for b in report["backends"]), "every backend says why (not)"


@pytest.mark.triton
def test_demo_in_process_prints_result_line(capsys):
    pytest.importorskip("rich")
    assert main(["demo", "--seq-len", "256", "--heads", "2", "--density", "0.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT pattern=random-blocks")]
    assert len(lines) == 1, out
    fields = dict(kv.split("=", 1) for kv in lines[0].split()[1:])
    assert fields["ok"] == "1"
    # float32 on the CPU; bfloat16 (bound ~ 2 x SDPA's bf16 error + 1.6e-2) on a GPU
    assert float(fields["max_abs_err"]) <= float(fields["bound"]) < (0.1 if torch.cuda.is_available() else 1e-3)
    assert "█" in out and "▒" in out  # the picture was drawn


@pytest.mark.triton
def test_demo_numbers_odd_length():
    # 300 tokens in blocks of 64: a ragged last block, and every row checked against float64.
    report = run_demo(seq_len=300, heads=2, batch=2, head_dim=32, block_size=64, density=0.3, seed=1)
    assert report["ok"]
    assert [r["name"] for r in report["patterns"]] == ["random-blocks", "hash", "drop", "dash"]
    for res in report["patterns"]:
        assert res["ok"], res["name"]
        assert res["states_roundtrip"] is True
        assert res["rows_checked"] == 300 or torch.cuda.is_available()
        assert res["max_abs_err"] <= res["bound"]
        assert 0.0 < res["kept_fraction"] <= 1.0
        assert res["build_ms"] > 0


@pytest.mark.triton
def test_demo_subprocess_sets_interpreter_itself():
    """A fresh `python -m flexsparse demo --json` works without TRITON_INTERPRET in the environment.

    Always on the CPU (on a GPU machine the builder then takes its PyTorch path), so no compile.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "flexsparse", "demo", "--device", "cpu", "--seq-len", "256", "--heads", "2", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["patterns"][0]["max_abs_err"] < 1e-3
    if not torch.cuda.is_available():
        assert report["config"]["builder"] == "triton (interpreter)"


def test_random_states_and_picture():
    pytest.importorskip("rich")
    gen = torch.Generator().manual_seed(0)
    n_tokens, bs = 130 * 16, 16  # 130 x 130 blocks
    states = random_block_states(2, 3, n_tokens, bs, 0.25, generator=gen, device="cpu")
    assert states.shape == (2, 3, 130, 130) and states.dtype == torch.int8
    eye = torch.eye(130, dtype=torch.bool)
    assert (states[..., eye] == PARTIAL).all()
    assert (states[..., ~eye.logical_or(torch.ones(130, 130, dtype=torch.bool).tril())] == EMPTY).all()
    below = torch.ones(130, 130, dtype=torch.bool).tril(-1)
    assert set(states[..., below].unique().tolist()) <= {EMPTY, FULL}
    kept = (states != EMPTY).sum().item() / (6 * 130 * 131 / 2)
    assert abs(kept - 0.25) < 0.02

    pooled, f = downsample_states(states[0, 0], max_cells=64)
    assert f == 3 and pooled.shape == (44, 44)
    for i, j in [(0, 0), (5, 2), (43, 43), (43, 0)]:
        block = states[0, 0, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
        assert pooled[i, j] == block.max()
    text, f2 = render_states(states[0, 0], max_cells=64)
    rows = text.plain.split("\n")
    assert f2 == 3 and len(rows) == 44 and all(len(r) == 44 for r in rows)
    assert rows[0][0] in "▒█" and rows[0][-1] == "·" and "█" in text.plain
