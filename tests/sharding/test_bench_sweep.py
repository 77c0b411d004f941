"""`python -m jaxinfer.bench --meshes ...`: one command sweeps layouts; meshes that do not fit
the devices or the model, and batches dp does not divide, become `skipped` rows, not crashes."""

import builtins
import json

import pytest

from jaxinfer import bench

ARGS = ["--model", "dummy", "--batch", "1,2", "--prompt-len", "4", "--gen-len", "3",
        "--repeat", "1", "--dtype", "float32", "--decode-steps", "2"]


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow  # four meshes in one bench run; its mesh errors and rate sweeps stay in the gate
def test_sweep_rows_table_and_chart(capsys, tmp_path, monkeypatch):
    chart = tmp_path / "sweep.png"
    code = bench.main(ARGS + ["--meshes", "tp=1;dp=2,tp=2;tp=16;tp=3",
                              "--chart", str(chart)])
    out, err = capsys.readouterr()
    assert code == 0
    rows = _rows(out)
    by = {(r["mesh"], r["batch"], r["metric"]): r for r in rows}
    for mesh, b in (("dp=1,pp=1,tp=1", 1), ("dp=1,pp=1,tp=1", 2), ("dp=2,pp=1,tp=2", 2)):
        for metric in ("decode_tok_s", "ttft_ms", "compile_s", "state_gb_per_device"):
            assert by[(mesh, b, metric)]["value"] > 0
    assert by[("dp=2,pp=1,tp=2", 1, "skipped")]["reason"] == "batch 1 is not a multiple of dp=2"
    assert by[("dp=1,pp=1,tp=16", None, "skipped")]["reason"] == "needs 16 devices, 8 present"
    assert "tp=3 does not divide num_heads=4" in by[("dp=1,pp=1,tp=3", None, "skipped")]["reason"]
    speedup = by[("dp=2,pp=1,tp=2", 2, "decode_speedup")]
    assert speedup["baseline_mesh"] == "dp=1,pp=1,tp=1" and speedup["value"] > 0
    # tp=2 splits the weights; each dp=2 replica holds only its half of the batch's KV pages:
    # less state on the fullest device.
    assert (by[("dp=2,pp=1,tp=2", 2, "state_gb_per_device")]["value"]
            < by[("dp=1,pp=1,tp=1", 2, "state_gb_per_device")]["value"])
    assert "skipping mesh dp=1,pp=1,tp=16: needs 16 devices, 8 present" in err
    table = [line for line in err.splitlines() if line.lstrip().startswith("dp=")]
    assert len(table) == 6  # 2 meshes x 2 batches (one batch skipped) + 2 skipped meshes
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in err
    else:
        assert chart.stat().st_size > 0

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    bench.write_chart(rows, str(tmp_path / "none.png"))
    assert capsys.readouterr().err.strip() == (
        "jaxinfer.bench: matplotlib is not installed; no chart written (pip install matplotlib)")
    assert not (tmp_path / "none.png").exists()


def test_sweep_bad_mesh_text(capsys):
    assert bench.main(ARGS + ["--meshes", "tp=2;qq=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "jaxinfer.bench: error: bad mesh item 'qq=1': expected dp=N, pp=N or tp=N"


def test_acceptance_rate_sweep_reuses_the_compiled_programs(capsys):
    """`--acceptance-rates` with the synthetic proposer: one row set per rate, the rate shows in
    the measured acceptance (0 keeps nothing, 1 keeps every draft), later rates compile
    nothing."""
    spec = '{"method": "synthetic", "num_speculative_tokens": 2, "acceptance_rate": 0.5}'
    code = bench.main(["--model", "dummy", "--batch", "1", "--prompt-len", "4", "--gen-len", "8",
                       "--repeat", "1", "--dtype", "float32", "--speculative-config", spec,
                       "--acceptance-rates", "0,1"])
    out, err = capsys.readouterr()
    assert code == 0
    by = {(json.loads(r["speculative"])["acceptance_rate"], r["metric"]): r["value"]
          for r in _rows(out)}
    assert by[(0.0, "spec_acceptance_rate")] == 0.0
    assert by[(1.0, "spec_acceptance_rate")] == 1.0
    assert by[(0.0, "compile_s")] > 0 and by[(1.0, "compile_s")] == 0.0
    assert "acceptance" in err.splitlines()[0]


def test_acceptance_rates_need_the_synthetic_proposer(capsys):
    assert bench.main(["--model", "dummy", "--acceptance-rates", "0.5"]) == 1
    assert capsys.readouterr().err.strip() == ('jaxinfer.bench: error: --acceptance-rates needs '
                                               '--speculative-config with "method": "synthetic"')
