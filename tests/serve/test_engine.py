"""The serving engine (front + engine core, the core on a thread here) on a tiny real model
(CPU): exact greedy tokens against offline generation under concurrency, prefix sharing and
preemption; offline equals served for the same requests (greedy, seeded samples, penalties,
logprobs); cancellation, deadlines, failure isolation, stop conditions (inside multi-step
decode runs too), validation, drain; zero recompiles after warm-up.

The model is the `dummy` shape with untied embeddings and layer weights scaled up, so its next
token depends on the whole context (the plain `dummy` mostly repeats its last token, which
would hide a wrong cache page).
"""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import PRESETS, EngineConfig
from jaxinfer.engine.core import EngineCore
from jaxinfer.engine.llm import LLM
from jaxinfer.engine.request import Request, SamplingOptions
from jaxinfer.errors import CapacityError, RequestError, UnavailableError
from jaxinfer.model_loader import LoadedModel, random_params
from jaxinfer.tokenizer import ByteTokenizer
from serve.engine_client import EngineClient
from sharding.mesh import make_mesh

SERVE = dict(page_size=4, max_seq_len=64, dtype="float32", max_num_batched_tokens=16,
             batch_buckets=(2, 4), prefill_buckets=(8, 16), prefill_rows=(1, 2),
             max_logprobs=3, max_n=2, decode_steps=4)
# 24 pages of 4 tokens: four long requests do not fit at once, so some are preempted.
ENGINE = EngineConfig(num_pages=24, **SERVE)
OFFLINE = EngineConfig(page_size=4, num_pages=400, max_seq_len=128, dtype="float32",
                       prefill_buckets=(16,), prefill_rows=(16,), batch_buckets=(16,),
                       max_num_batched_tokens=256, decode_steps=8, max_logprobs=3, max_n=2)


def _model(mesh) -> LoadedModel:
    cfg = dataclasses.replace(PRESETS["dummy"], tie_word_embeddings=False)
    graphdef, params = random_params(cfg, mesh, jnp.float32, 3)

    def scale(path, x):
        name = jax.tree_util.keystr(path)
        return x * 5 if "layers" in name and "norm" not in name else x

    params = jax.tree_util.tree_map_with_path(scale, params)
    return LoadedModel(cfg, graphdef, params, ByteTokenizer(cfg.vocab_size), "dummy-untied-x5")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("dp=1", devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def model(mesh):
    return _model(mesh)


@pytest.fixture(scope="module")
def engine(model, mesh):
    eng = EngineClient.in_process([EngineCore.create(model, ENGINE, mesh=mesh)],
                                  tokenizer=model.tokenizer, max_queue=64)
    eng.warmup(progress=False)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def offline(model, mesh):
    """Offline generation (the same engine core code, its own core and buckets)."""
    llm = LLM.from_loaded(model, OFFLINE, mesh=mesh)
    cache = {}

    def greedy(prompts, max_new):
        """Greedy tokens of each prompt, generated offline in one batch (rows independent)."""
        todo = [p for p in prompts if (tuple(p), max_new) not in cache]
        if todo:
            reqs = [llm.request(p, max_tokens=max_new) for p in todo]
            for p, c in zip(todo, llm.generate(reqs)):
                cache[(tuple(p), max_new)] = c[0].token_ids
        return [cache[(tuple(p), max_new)] for p in prompts]

    llm.greedy = greedy
    return llm


@pytest.fixture(scope="module")
def same_offline(model, mesh):
    """Offline generation with exactly the server's engine config."""
    return LLM.from_loaded(model, ENGINE, mesh=mesh)


class Collector:
    """on_output callback that gathers each request's stream."""

    def __init__(self):
        self.outs: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def expect(self, rid):
        self.done[rid] = threading.Event()

    def __call__(self, out):
        with self._lock:
            self.outs.setdefault(out.request_id, []).append(out)
        if out.usage is not None:
            self.done[out.request_id].set()

    def wait(self, rids, timeout=120):
        for rid in rids:
            assert self.done[rid].wait(timeout), f"request {rid} did not finish"

    def tokens(self, rid, index=0):
        return [t for o in self.outs[rid] if o.index == index for t in o.token_ids]

    def text(self, rid, index=0):
        return "".join(o.text for o in self.outs[rid] if o.index == index)

    def final(self, rid, index=0):
        return [o for o in self.outs[rid] if o.index == index and o.finish_reason][-1]


def submit(engine, col, rid, prompt, max_tokens, **kw):
    col.expect(rid)
    engine.submit(Request(request_id=rid, prompt_ids=list(prompt), max_tokens=max_tokens, **kw),
                  col)


def wait_idle(engine, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["pages_used"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def expected(ref, max_tokens, eos=(257,)):
    out = []
    for t in ref[:max_tokens]:
        out.append(t)
        if t in eos:
            break
    return out


def test_concurrent_greedy_equals_offline(engine, offline):
    rng = np.random.default_rng(0)
    shared = [256] + list(range(60, 71))  # 12 tokens: 3 full pages shared by several prompts
    prompts = []
    for i in range(12):
        head = shared if i % 3 == 0 else [256]
        prompts.append(head + rng.integers(0, 256, size=int(rng.integers(1, 20))).tolist())
    max_tokens = [int(rng.integers(8, 64 - len(p) + 1)) for p in prompts]
    refs = offline.greedy(prompts, 62)
    col = Collector()
    before = engine.stats()
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        submit(engine, col, f"c{i}", p, m)
    col.wait([f"c{i}" for i in range(12)])
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        want = expected(refs[i], m)
        assert col.tokens(f"c{i}") == want, (i, col.tokens(f"c{i}"), want, refs[i], m)
        final = col.final(f"c{i}")
        assert final.finish_reason == ("stop" if want[-1] == 257 else "length")
        assert final.usage.prompt_tokens == len(p)
        assert final.usage.completion_tokens == len(want)
    after = wait_idle(engine)
    assert after["preemptions"] > before["preemptions"]  # the tiny pool forced recompute
    assert after["prefix_hit_tokens"] > before["prefix_hit_tokens"]
    assert engine.num_recompiles == 0


def test_greedy_independent_of_batch(engine, offline):
    p = [256, 10, 20, 30, 40, 50]
    col = Collector()
    submit(engine, col, "alone", p, 20)
    col.wait(["alone"])
    for i in range(3):
        submit(engine, col, f"other{i}", [256, 7 + i] * (3 + 5 * i), 25)
    submit(engine, col, "crowd", p, 20)
    col.wait(["crowd"] + [f"other{i}" for i in range(3)])
    assert col.tokens("alone") == col.tokens("crowd") == expected(offline.greedy([p], 62)[0], 20)


def test_cancel_frees_pages_at_once(engine):
    col = Collector()

    def cb(out):  # cancel as soon as the first token streams (from the output thread)
        col(out)
        if len(col.outs["long"]) == 1:
            engine.cancel("long")

    col.expect("long")
    engine.submit(Request(request_id="long", prompt_ids=[256, 1, 2, 3], max_tokens=55), cb)
    col.wait(["long"])
    final = col.final("long")
    assert final.finish_reason == "cancelled" and final.usage is not None
    assert len(col.tokens("long")) < 55
    wait_idle(engine)
    engine.cancel("long")  # unknown by now: ignored


def test_deadline_passed_finishes_with_deadline(engine):
    col = Collector()
    submit(engine, col, "late", [256, 5, 6], 30, deadline=time.monotonic() - 1)
    submit(engine, col, "soon", [256, 5, 6, 7], 55, deadline=time.monotonic() + 0.05)
    col.wait(["late", "soon"])
    assert col.final("late").finish_reason == "deadline" and col.tokens("late") == []
    soon = col.final("soon")
    assert soon.finish_reason in ("deadline", "length")
    assert soon.finish_reason == "deadline" or len(col.tokens("soon")) == 55
    wait_idle(engine)


def test_failing_callback_fails_only_its_request(engine, offline):
    col = Collector()
    calls = []

    def bad(out):
        calls.append(out)
        if len(calls) == 2:
            raise RuntimeError("injected failure in this stream")

    engine.submit(Request(request_id="bad", prompt_ids=[256, 3, 4], max_tokens=30), bad)
    prompts = [[256, 11, 12], [256, 13, 14, 15]]
    for i, p in enumerate(prompts):
        submit(engine, col, f"ok{i}", p, 30)
    col.wait(["ok0", "ok1"])
    refs = offline.greedy(prompts, 62)
    for i in range(2):
        assert col.tokens(f"ok{i}") == expected(refs[i], 30)
    wait_idle(engine)
    assert calls[-1].finish_reason == "error" and "injected" in calls[-1].error
    assert len(calls) == 3  # two token outputs (the second raised), then the error


def test_stop_conditions(engine, offline):
    p = [256, 77, 78, 79]
    ref = expected(offline.greedy([p], 62)[0], 40)
    col = Collector()
    submit(engine, col, "full", p, 40)
    col.wait(["full"])
    full_text = col.text("full")
    assert col.tokens("full") == ref
    # stop token id: the 5th token
    submit(engine, col, "sid", p, 40, stop_token_ids=(ref[4],))
    # max_tokens
    submit(engine, col, "max", p, 3)
    # stop string: two printable characters from the middle of the text
    stop = next(full_text[i: i + 2] for i in range(3, len(full_text) - 1)
                if full_text[i: i + 2].isprintable() and full_text[i: i + 2].strip())
    submit(engine, col, "sstr", p, 40, stop_strings=(stop, "never-there"))
    col.wait(["sid", "max", "sstr"])
    k = ref.index(ref[4])
    assert col.tokens("sid") == ref[: k + 1] and col.final("sid").finish_reason == "stop"
    assert col.tokens("max") == ref[:3] and col.final("max").finish_reason == "length"
    assert col.text("sstr") == full_text[: full_text.index(stop)]
    assert col.final("sstr").finish_reason == "stop"
    assert len(col.tokens("sstr")) < len(ref)
    wait_idle(engine)


def test_eos_inside_a_multi_step_run(model, mesh, offline):
    """The device stops a row at EOS (unless ignore_eos) in the middle of a decode dispatch:
    a model whose EOS is the 6th greedy token, decoding 4 tokens per dispatch."""
    p = [256, 77, 78, 79]
    ref = offline.greedy([p], 40)[0]
    eos = ref[5]
    cfg = dataclasses.replace(model.cfg, eos_token_ids=(eos,))
    llm = LLM.from_loaded(dataclasses.replace(model, cfg=cfg),
                          dataclasses.replace(ENGINE, batch_buckets=(2,)), mesh=mesh)
    eos_out, ign = llm.generate([llm.request(p, max_tokens=40),
                                 llm.request(p, max_tokens=10, ignore_eos=True)])
    assert eos_out[0].token_ids == ref[: ref.index(eos) + 1]
    assert eos_out[0].finish_reason == "stop"
    assert ign[0].token_ids == ref[:10] and ign[0].finish_reason == "length"
    assert llm.pages_used() == 0


def test_n2_seeded_samples_reproducible_and_match_offline(engine, offline):
    p = [256, 40, 41, 42, 43, 44, 45, 46, 47, 48]
    opts = SamplingOptions(temperature=1.0, top_p=0.95, seed=7)
    col = Collector()
    submit(engine, col, "s1", p, 12, n=2, sampling=opts)
    col.wait(["s1"])
    submit(engine, col, "s2", p, 12, n=2, sampling=opts)
    col.wait(["s2"])
    a = [col.tokens("s1", i) for i in range(2)]
    b = [col.tokens("s2", i) for i in range(2)]
    assert a == b and a[0] != a[1]
    assert col.final("s1", 1).usage is not None or col.final("s1", 0).usage is not None
    ref = offline.generate([offline.request(p, max_tokens=12, n=2, sampling=opts)])[0]
    assert a == [expected(r.token_ids, 12) for r in ref]
    wait_idle(engine)


def test_logprobs(engine, offline):
    col = Collector()
    p = [256, 9, 8, 7]
    submit(engine, col, "lp", p, 6, logprobs=3)
    submit(engine, col, "nolp", p, 6)
    col.wait(["lp", "nolp"])
    # Both decode through the full sampler (one row wants logprobs): still exact greedy.
    ref = expected(offline.greedy([p], 62)[0], 6)
    assert col.tokens("lp") == col.tokens("nolp") == ref
    outs = [o for o in col.outs["lp"] if o.token_ids]
    assert sum(len(o.token_ids) for o in outs) == 6
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids)
        lp = o.logprobs[0]
        assert lp.token_id == o.token_ids[0] and len(lp.top) == 3
        tops = [x[1] for x in lp.top]
        assert tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(tops[0], abs=1e-5)
    assert all(o.logprobs == () for o in col.outs["nolp"])


def test_penalties_follow_host_reference(engine, offline, model):
    p = [256, 5, 5, 9, 9, 9, 14]
    opts = SamplingOptions(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)
    col = Collector()
    submit(engine, col, "pen", p, 8, sampling=opts)
    col.wait(["pen"])
    # Host reference: full logits of the sequence so far, penalized with numpy, argmax.
    seq, out = list(p), []
    for _ in range(8):
        lg = offline.prompt_logits(seq)[-1].astype(np.float64)
        seen = np.zeros_like(lg, bool)
        seen[seq] = True
        counts = np.bincount(out, minlength=lg.size)
        lg = np.where(seen, np.where(lg > 0, lg / 1.5, lg * 1.5), lg)
        lg = lg - 0.7 * counts - 0.4 * (counts > 0)
        out.append(int(np.argmax(lg)))
        seq.append(out[-1])
        if out[-1] == 257:
            break
    assert col.tokens("pen") == out
    assert offline.pages_used() == 0


def test_offline_equals_served(engine, same_offline):
    """The same requests offline (LLM) and served, on the same engine config: greedy, seeded
    samples (n=2), penalties and logprobs give the same tokens and logprobs."""
    prompts = [[256, 10, 20, 30], [256, 7, 7, 7, 7, 8], [256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    kinds = [dict(),
             dict(sampling=SamplingOptions(temperature=0.9, top_k=20, top_p=0.9, seed=11), n=2),
             dict(sampling=SamplingOptions(temperature=0.7, min_p=0.05, seed=3,
                                           repetition_penalty=1.3, presence_penalty=0.5,
                                           frequency_penalty=0.2)),
             dict(logprobs=3),
             dict(sampling=SamplingOptions(temperature=1.0, seed=5), logprobs=2)]
    col = Collector()
    offline_reqs, ids = [], []
    for i, p in enumerate(prompts):
        for j, kw in enumerate(kinds):
            rid = f"eq{i}-{j}"
            submit(engine, col, rid, p, 14, **kw)
            offline_reqs.append(same_offline.request(p, max_tokens=14, **kw))
            ids.append((rid, kw.get("n", 1)))
    col.wait([rid for rid, _ in ids])
    results = same_offline.generate(offline_reqs)
    for (rid, n), samples in zip(ids, results):
        for c in samples:
            assert col.tokens(rid, c.index) == c.token_ids, (rid, c.index)
            assert col.final(rid, c.index).finish_reason == c.finish_reason
            if c.logprobs is not None:
                served = [lp for o in col.outs[rid] if o.index == c.index for lp in o.logprobs]
                assert len(served) == len(c.logprobs)
                for a, b in zip(served, c.logprobs):  # batch composition: float rounding only
                    assert a.token_id == b.token_id and [t for t, _ in a.top] == [
                        t for t, _ in b.top]
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    wait_idle(engine)


def test_validation_and_capacity(engine):
    def r(**kw):
        base = dict(request_id="v", prompt_ids=[256, 1], max_tokens=4)
        base.update(kw)
        return Request(**base)

    bad = [r(prompt_ids=[]), r(prompt_ids=[1, 512]), r(prompt_ids=[-1]), r(max_tokens=0),
           r(max_tokens=63), r(n=3), r(logprobs=4), r(sampling=SamplingOptions(temperature=-1)),
           r(sampling=SamplingOptions(top_p=0)), r(sampling=SamplingOptions(seed=-5)),
           r(stop_token_ids=(600,)), r(stop_strings=("",)), r(request_id="")]
    for req in bad:
        with pytest.raises(RequestError):
            engine.submit(req, lambda out: None)
    limit = engine.max_queue
    engine.max_queue = 0  # a full queue, without flooding the test machine
    try:
        with pytest.raises(CapacityError):
            engine.submit(r(), lambda out: None)
    finally:
        engine.max_queue = limit
    info = engine.info()
    assert info["limits"]["max_seq_len"] == 64 and info["limits"]["num_pages"] == 24
    # decode (B 2, 4) x (1 step full, 4 steps greedy, 4 steps full) + prefill (1, 8), (1, 16),
    # (2, 8)
    assert info["programs"] == 9


def test_drain_then_unavailable_and_no_recompiles(engine):
    col = Collector()
    for i in range(5):
        submit(engine, col, f"d{i}", [256, 20 + i, 3], 20)
    assert engine.drain(timeout=120)
    assert all(col.done[f"d{i}"].is_set() for i in range(5))
    with pytest.raises(UnavailableError):
        engine.submit(Request(request_id="x", prompt_ids=[256], max_tokens=2), col)
    assert engine.num_recompiles == 0
    assert engine.stats()["recompiles"] == 0


def test_a_failed_device_step_fails_its_requests_and_the_core_goes_on(same_offline,
                                                                     monkeypatch):
    """A decode dispatch that raises fails the requests running then (all their samples, the
    waiting second sample of an n=2 request too), resets the device state, and the next
    requests are served exactly."""
    llm = same_offline
    runner = llm.core.runner
    p = [256, 3, 1, 4, 1, 5]
    want = llm.generate([llm.request(p, max_tokens=6)])[0][0].token_ids
    real_decode = runner.decode
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected device failure")
        return real_decode(*args, **kw)

    monkeypatch.setattr(runner, "decode", failing)
    out = llm.generate([llm.request(p, max_tokens=12),
                        llm.request([256] + list(range(7, 30)), max_tokens=12, n=2)])
    reasons = [c.finish_reason for samples in out for c in samples]
    assert "error" in reasons and all(r in ("error", "length", "stop") for r in reasons)
    assert all("injected device failure" in c.error for s in out for c in s
               if c.finish_reason == "error")
    assert llm.pages_used() == 0
    monkeypatch.setattr(runner, "decode", real_decode)
    assert llm.generate([llm.request(p, max_tokens=6)])[0][0].token_ids == want
