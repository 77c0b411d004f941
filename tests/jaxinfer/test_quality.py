"""`python -m jaxinfer.bench quality`: the metrics by hand, the command on the bundled demo model
(trained), and its errors.

On the demo model (CPU, float32, the default texts: its greedy continuations of the fixed
prompts, 508 positions at --seq-len 128) the measured numbers were: int8 top-1 agreement
0.994, KL 7.6e-5 nats; fp8 0.984, KL 2.0e-3; int4-g128 0.972, KL 0.0152, NLL +0.0096 nats. The
test runs int4-g128 on those texts and asks for >= 0.95, the issue's target for int4 (at
--seq-len 64, 252 positions, it measured 0.944, so the test keeps the default length).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxinfer import bench
from jaxinfer.quality import compare


def test_compare_by_hand():
    """Two positions over a 4-token vocabulary. Position 0: the reference is uniform, the other
    model puts 1/2 on token 0 (logits [log 3, 0, 0, 0]); both argmaxes are token 0 (ties go to
    the first), target token 1. Position 1: the reference prefers token 2, the other token 3,
    with the same distribution shape, target token 2."""
    ref = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    test = np.array([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    q = compare([ref], [test], [np.array([1, 2])])
    assert q.positions == 2
    assert q.top1_agreement == 0.5
    # KL position 0: 1/4 log(1/4 / 1/2) + 3/4 log(1/4 / 1/6); position 1: p and q are the same
    # distribution with tokens 2 and 3 swapped: p2 log(p2/p3) + p3 log(p3/p2) = (p2-p3)(2 - 0).
    z = 3.0 + math.e ** 2
    p_hi, p_lo = math.e ** 2 / z, 1 / z
    kl0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl1 = (p_hi - p_lo) * 2.0
    assert q.kl_nats == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    # NLL: position 0, -log(1/4) against -log(1/6); position 1, -log p_hi against -log p_lo.
    assert q.nll_ref == pytest.approx((math.log(4) - math.log(p_hi)) / 2, rel=1e-12)
    assert q.nll_delta == pytest.approx((math.log(1.5) + math.log(p_hi / p_lo)) / 2, rel=1e-12)
    same = compare([ref], [ref], [np.array([1, 2])])
    assert (same.top1_agreement, same.kl_nats, same.nll_delta) == (1.0, 0.0, 0.0)


def _rows(capsys, *args) -> dict[str, dict]:
    assert bench.main(["quality", "--model", "demo", *args]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["metric"] for r in rows] == ["top1_agreement", "kl_nats", "nll_delta"]
    return {r["metric"]: r for r in rows}


def test_demo_model_against_itself_and_int4(capsys):
    same = _rows(capsys, "--quant", "none")
    assert same["top1_agreement"]["value"] == 1.0
    assert same["kl_nats"]["value"] == 0.0 and same["nll_delta"]["value"] == 0.0
    assert same["nll_delta"]["nll_ref"] > 0 and same["top1_agreement"]["positions"] == 4 * 127
    int4 = _rows(capsys, "--quant", "int4-g128")
    row = int4["top1_agreement"]
    assert row["name"] == "quality" and row["quant"] == "int4-g128" and row["unit"] == "fraction"
    assert row["value"] >= 0.95, row
    assert 0 < int4["kl_nats"]["value"] < 0.05
    # The same reference texts: the unquantized NLL is what the self-comparison measured.
    assert int4["nll_delta"]["nll_ref"] == same["nll_delta"]["nll_ref"]


def test_text_file_and_cache_dtype(capsys):
    """--quant none --cache-dtype int8 measures the quantized KV cache alone (the unquantized
    model keeps a float cache), on two 128-token windows of a Python file of this repository.
    Measured: agreement 0.988, KL 1.5e-4 nats."""
    text = str(Path(__file__).resolve().parents[2] / "jaxinfer" / "errors.py")
    rows = _rows(capsys, "--quant", "none", "--cache-dtype", "int8", "--text-file", text,
                 "--windows", "2")
    row = rows["kl_nats"]
    assert row["text"] == text and row["cache_dtype"] == "int8" and row["positions"] == 2 * 127
    assert 0 < row["value"] < 1e-3
    assert rows["top1_agreement"]["value"] >= 0.97


@pytest.mark.parametrize("args,message", [
    (["--quant", "int3"], "--quant must be one of"),
    (["--quant", "int8", "--cache-dtype", "int2"], "--cache-dtype must be one of"),
    (["--quant", "int8", "--seq-len", "x"], "invalid int value"),
    (["--quant", "int8", "--text-file", "/no/such/file"], "no such file"),
    (["--model", "/no/such/dir", "--quant", "int8"], "/no/such/dir"),
])
def test_bad_arguments_one_line_exit_1(capsys, args, message):
    argv = ["quality"] + (["--model", "demo"] if "--model" not in args else []) + args
    try:
        code = bench.main(argv)
    except SystemExit as e:  # argparse's own errors (a non-integer), routed to exit code 1
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("jaxinfer.bench quality: error:") and message in err[0], err
