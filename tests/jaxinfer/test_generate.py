"""Offline generation (`jaxinfer.engine.llm.LLM`) on the dummy preset: batching, recompiles,
seeds, stops, request validation, page pressure, and the CLI contract."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.engine.request import SamplingOptions
from jaxinfer.errors import RequestError
from jaxinfer.model_loader import load_model
from sharding.mesh import make_mesh

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[256, 72, 105], [256] + list(range(40, 77)), [256, 9]]


@pytest.fixture(scope="module")
def loaded():
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    return load_model("dummy", mesh=mesh, dtype="float32", seed=1), mesh


@pytest.fixture(scope="module")
def llm(loaded):
    model, mesh = loaded
    engine = EngineConfig(page_size=4, num_pages=96, max_seq_len=96, dtype="float32",
                          prefill_buckets=(8, 16), prefill_rows=(1, 4), batch_buckets=(1, 4),
                          decode_steps=4)
    return LLM.from_loaded(model, engine, mesh=mesh)


def _tokens(llm, prompts, max_tokens, **kw) -> list[list[int]]:
    out = llm.generate([llm.request(p, max_tokens=max_tokens, **kw) for p in prompts])
    return [c.token_ids for [c] in out]


def test_batch_equals_alone_and_no_recompile(llm):
    alone = [_tokens(llm, [p], 13)[0] for p in PROMPTS]
    assert [len(t) for t in alone] == [13] * 3
    compiles = llm.num_compiles
    assert _tokens(llm, PROMPTS, 13) == alone
    warm = llm.num_compiles
    assert warm > compiles  # the batch of 3 used new buckets ...
    assert _tokens(llm, PROMPTS, 13) == alone and llm.num_compiles == warm  # ... and never again
    assert llm.pages_used() == 0
    llm.core.scheduler.kv.check()


def test_more_requests_than_slots_wait_their_turn(llm):
    """5 requests on 4 decode slots: the fifth waits for a free slot (it used to be a
    RequestError) and every request still gets its alone tokens."""
    prompts = [[256, 7 + i, 3 * i] for i in range(5)]
    alone = [_tokens(llm, [p], 6)[0] for p in prompts]
    assert _tokens(llm, prompts, 6) == alone
    assert llm.pages_used() == 0


def test_sampling_is_reproducible_and_seed_dependent(llm):
    def draw(seed):
        s = SamplingOptions(temperature=1.0, top_p=0.9, seed=seed)
        return _tokens(llm, [[256, 1, 2]], 10, sampling=s)[0]

    a, b, c = draw(5), draw(5), draw(6)
    assert a == b and a != c
    # n samples: sample i uses seed + i, so sample 1 of seed 5 is sample 0 of seed 6
    two = SamplingOptions(temperature=1.0, top_p=0.9, seed=5)
    [samples] = llm.generate([llm.request([256, 1, 2], max_tokens=10, n=2, sampling=two)])
    assert [s.token_ids for s in samples] == [a, c]
    # a request without a seed uses its index in the list
    unseeded = SamplingOptions(temperature=1.0, top_p=0.9)
    out = llm.generate([llm.request([256, 1, 2], max_tokens=10, sampling=unseeded)
                        for _ in range(7)])
    assert out[5][0].token_ids == a and out[6][0].token_ids == c


def test_eos_stops_with_reason(llm, loaded):
    [[greedy]] = llm.generate([llm.request([256, 3], max_tokens=6)])
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6
    # make the 3rd generated token the EOS id and check generation stops there
    model, mesh = loaded
    eos = greedy.token_ids[2]
    with_eos = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, eos_token_ids=(eos,)))
    llm2 = LLM.from_loaded(with_eos, llm.core.engine_cfg, mesh=mesh)
    [[out]] = llm2.generate([llm2.request([256, 3], max_tokens=6)])
    first = greedy.token_ids.index(eos)
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"
    [[past]] = llm2.generate([llm2.request([256, 3], max_tokens=6, ignore_eos=True)])
    assert past.token_ids == greedy.token_ids and past.finish_reason == "length"


@pytest.mark.parametrize("prompt,max_tokens,needle", [
    ([], 4, "prompt_ids is empty"), ([1, 2], 0, "max_tokens"),
    ([1, 99999], 4, "outside the vocabulary"), ([1] * 90, 10, "context limit")])
def test_bad_requests(llm, prompt, max_tokens, needle):
    with pytest.raises(RequestError, match=needle):
        llm.generate([llm.request([1, 2], max_tokens=3),
                      llm.request(prompt, max_tokens=max_tokens)])
    assert llm.pages_used() == 0 and not llm.core.has_unfinished()  # nothing was queued


def test_request_larger_than_the_pool_is_rejected(loaded):
    model, mesh = loaded
    small = EngineConfig(page_size=4, num_pages=8, max_seq_len=96, dtype="float32",
                         prefill_buckets=(16,), prefill_rows=(1,), batch_buckets=(4,))
    llm = LLM.from_loaded(model, small, mesh=mesh)
    with pytest.raises(RequestError, match="KV pages"):  # 40 tokens need 10 pages of 8
        llm.generate([llm.request([1] * 30, max_tokens=10)])


def test_page_pressure_preempts_and_frees_what_it_took(llm, monkeypatch):
    """Someone else holds 60 of the 96 pages; two sequences that need 23 pages each cannot
    both finish in the 36 left (it used to be a CapacityError): one is preempted and
    recomputed, the tokens equal the unconstrained ones, and afterwards only the outside 60
    pages are held."""
    prompts = [[1] * 60, [2] * 60]
    want = _tokens(llm, prompts, 30)
    kv = llm.core.scheduler.kv
    outsider = -12345
    assert kv.allocate(outsider, 60 * 4) is not None
    try:
        preempted = []
        real_step = llm.core.step

        def step():
            out, stats = real_step()
            preempted.append(stats.preemptions)
            return out, stats

        monkeypatch.setattr(llm.core, "step", step)
        assert _tokens(llm, prompts, 30) == want
        monkeypatch.undo()
        assert sum(preempted) >= 1
        assert llm.pages_used() == 60
        kv.check()
    finally:
        kv.free(outsider)
    assert llm.pages_used() == 0


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxinfer.generate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "XLA_FLAGS": ""})


def test_cli_json_contract():
    r = _cli("--model", "dummy", "--prompt-ids", "256,72,105", "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()
    out = json.loads(line)
    assert set(out) == {"prompt_ids", "token_ids", "text", "finish_reason"}
    assert out["prompt_ids"] == [256, 72, 105] and len(out["token_ids"]) == 5
    assert out["finish_reason"] == "length"


def test_cli_error_is_one_line_from_the_command():
    r = _cli("--model", "no-such-model")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "neither a directory, a bundled model (demo)" in lines[0], r.stderr


@pytest.mark.parametrize("args,needle", [
    (("--model", "dummy", "--prompt-ids", "1,x"), "comma-separated integers"),
    (("--model", "dummy", "--prompt-ids", "1,2", "--temperature", "-1"), "temperature"),
    (("--model", "dummy", "--mesh", "tp=64"), "needs 64 devices"),
])
def test_cli_errors_are_one_line(args, needle, capsys):
    """The same checks in this process (a command per case costs seconds of imports)."""
    from jaxinfer import generate

    assert generate.main(list(args)) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], err
