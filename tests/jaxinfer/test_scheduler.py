"""The scheduler against the hand-computable fake device (tests/jaxinfer/fake_device.py).

Most tests run twice: one decode token per dispatch, and several (`decode_steps`), where the
device stops rows itself; the tokens must be the same."""

import random
import time

import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler
from tests.jaxinfer.fake_device import FakeDevice, drive, expected_tokens

V = 1000


@pytest.fixture(params=[1, 4], ids=["1step", "4steps"], autouse=True)
def decode_steps(request, monkeypatch):
    """Run each test with one and with four decode tokens per dispatch."""
    monkeypatch.setattr(_defaults, "decode_steps", request.param)
    return request.param


class _defaults:
    decode_steps = 1


def cfg(**kw):
    base = dict(page_size=4, num_pages=64, max_seq_len=64, max_num_batched_tokens=16,
                batch_buckets=(2, 4), prefill_buckets=(4, 8), prefill_rows=(1, 2),
                page_buckets=(16,), decode_steps=_defaults.decode_steps, max_stop_token_ids=4)
    base.update(kw)
    return EngineConfig(**base)


def req(rid, prompt, max_tokens, **kw):
    return Request(request_id=str(rid), prompt_ids=list(prompt), max_tokens=max_tokens, **kw)


def run_all(sched, reqs, *, dev=None, **kw):
    seqs = []
    for r in reqs:
        seqs += sched.add_request(r, seed=0)
    drive(sched, dev or FakeDevice(sched, V), **kw)
    return seqs


def test_tokens_correct_and_pages_return_to_zero():
    sched = Scheduler(cfg())
    prompts = [[1, 2, 3], list(range(5, 30)), [7] * 9, [4]]
    seqs = run_all(sched, [req(i, p, 6 + i) for i, p in enumerate(prompts)])
    for seq, p in zip(seqs, prompts):
        assert seq.output_ids() == expected_tokens(p, seq.request.max_tokens, V)
        assert seq.finish_reason == "length"
    assert sched.kv.num_used == 0 and not sched.has_unfinished()
    sched.check()


def test_budget_is_filled_and_respected():
    sched = Scheduler(cfg(decode_steps=1))  # steps with prefill decode one token anyway
    steps = []

    def on_step(out):
        steps.append(out)
        if out.step == 6:  # three sequences decode; two long prompts arrive
            for i in range(2):
                sched.add_request(req(f"long{i}", [i + 1] * 20, 3), seed=0)

    for i in range(2):
        sched.add_request(req(i, [i + 1] * 3, 20), seed=0)
    run_all(sched, [], on_step=on_step)
    for out in steps:
        assert out.num_batched_tokens <= 16
        real = int(out.decode_rows_steps.sum() + out.prefill_lens.sum())
        assert real == out.num_batched_tokens
    # 2 decodes + a chunk of 8 + a chunk of 6: the budget and both prefill rows are used.
    packed = [o for o in steps if len(o.prefill_seqs) == 2 and len(o.decode_seqs) == 2]
    assert packed and packed[0].num_batched_tokens == 16
    assert sorted(packed[0].prefill_lens.tolist()) == [6, 8]


def test_chunked_prefill_never_stalls_decoding():
    sched = Scheduler(cfg())
    short = sched.add_request(req("s", [3, 1], 30), seed=0)[0]
    seen = []

    def on_step(out):
        if out.step == 4:  # a long prompt arrives while `s` decodes
            sched.add_request(req("l", list(range(1, 50)), 2), seed=0)
        if any(s.request.request_id == "l" for s in out.prefill_seqs):
            seen.append((max(out.prefill_lens), short in out.decode_seqs))

    run_all(sched, [], on_step=on_step)
    assert len(seen) >= 4  # 49 tokens in chunks of at most 8
    assert all(n <= 8 and decoding for n, decoding in seen)
    assert short.output_ids() == expected_tokens([3, 1], 30, V)


def test_preemption_by_recompute_keeps_tokens_exact():
    # 10 pages of 4 tokens; 4 sequences that each grow to 6 pages cannot all fit.
    sched = Scheduler(cfg(num_pages=10))
    prompts = [[i + 1] * 6 for i in range(4)]
    seqs = run_all(sched, [req(i, p, 18) for i, p in enumerate(prompts)])
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions for s in seqs)
    for seq, p in zip(seqs, prompts):
        assert seq.output_ids() == expected_tokens(p, 18, V)
    assert sched.kv.num_used == 0
    sched.check()


def test_preemption_order_lowest_priority_latest_arrival_first():
    sched = Scheduler(cfg(num_pages=8, batch_buckets=(2, 4)))
    now = time.monotonic()
    hi = sched.add_request(req("hi", [1] * 4, 24, priority=0, arrival=now + 2), seed=0)[0]
    lo_old = sched.add_request(req("lo_old", [2] * 4, 24, priority=1, arrival=now), seed=0)[0]
    lo_new = sched.add_request(req("lo_new", [3] * 4, 24, priority=1, arrival=now + 1),
                               seed=0)[0]
    run_all(sched, [])
    assert hi.num_preemptions == 0
    assert lo_new.num_preemptions >= 1
    assert lo_new.num_preemptions >= lo_old.num_preemptions
    for s, t in ((hi, 1), (lo_old, 2), (lo_new, 3)):
        assert s.output_ids() == expected_tokens([t] * 4, 24, V)


def test_priority_then_fifo_admission():
    # One slot only: requests run one at a time, in (priority, arrival) order.
    sched = Scheduler(cfg(batch_buckets=(1,), max_num_batched_tokens=8,
                          prefill_buckets=(4, 8), prefill_rows=(1,)))
    now = time.monotonic()
    order = []
    specs = [("a", 1, 0.0), ("b", 0, 0.1), ("c", 1, 0.2), ("d", 0, 0.3)]
    for rid, prio, dt in specs:
        sched.add_request(req(rid, [5, 6], 2, priority=prio, arrival=now + dt), seed=0)

    def on_step(out):
        for s in out.prefill_seqs:
            if s.request.request_id not in order:
                order.append(s.request.request_id)

    run_all(sched, [], on_step=on_step)
    assert order == ["b", "d", "a", "c"]


def test_prefix_sharing_hits_and_tokens():
    sched = Scheduler(cfg())
    prefix = list(range(10, 22))  # 3 full pages
    a = sched.add_request(req("a", prefix + [1, 2], 20), seed=0)[0]
    dev = FakeDevice(sched, V)
    b_box = []
    lookups = []

    def on_step(out):
        lookups.extend(out.lookups)
        if out.step == 5:
            b_box.extend(sched.add_request(req("b", prefix + [3], 4), seed=0))
        if b_box and b_box[0] in out.prefill_seqs:
            pb = sched.kv.pages(b_box[0].seq_id)
            pa = sched.kv.pages(a.seq_id)
            assert pb[:3] == pa[:3]  # shared, copy-free

    drive(sched, dev, on_step=on_step)
    b = b_box[0]
    assert b.num_cached_tokens == 12
    assert (12, 13) in lookups
    assert a.output_ids() == expected_tokens(prefix + [1, 2], 20, V)
    assert b.output_ids() == expected_tokens(prefix + [3], 4, V)
    assert sched.kv.hit_tokens == 12
    assert sched.kv.num_used == 0


def test_n_samples_share_prompt_pages():
    sched = Scheduler(cfg())
    prompt = list(range(1, 11))  # 2 full pages + 2 tokens
    seqs = sched.add_request(req("n", prompt, 5, n=3), seed=0)
    shared = []

    def on_step(out):
        for s in out.prefill_seqs:
            if s.index > 0:
                shared.append(sched.kv.pages(s.seq_id)[:2] == sched.kv.pages(seqs[0].seq_id)[:2])

    run_all(sched, [], on_step=on_step)
    assert shared and all(shared)
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]
    for s in seqs:  # the fake device is deterministic: every sample gives the same tokens
        assert s.output_ids() == expected_tokens(prompt, 5, V)
    assert sched.kv.num_used == 0


def test_page_aligned_prompt_recomputes_last_block():
    sched = Scheduler(cfg())
    prompt = list(range(1, 9))  # exactly 2 pages
    dev = FakeDevice(sched, V)  # one device: the cache contents outlive the first request
    a = run_all(sched, [req("a", prompt, 3)], dev=dev)[0]
    b = run_all(sched, [req("b", prompt, 3)], dev=dev)[0]
    assert b.num_cached_tokens == 4  # not 8: the last token's logits are needed
    assert a.output_ids() == b.output_ids() == expected_tokens(prompt, 3, V)


@pytest.mark.parametrize("kind", ["eos", "ignore_eos", "stop_id", "max_tokens"])
def test_stop_conditions(kind):
    prompt = [11, 12, 13]
    stop_tok = expected_tokens(prompt, 12, V)[4]
    full = expected_tokens(prompt, 12, V)
    upto = expected_tokens(prompt, 12, V, stop=lambda t: t == stop_tok)
    kw, eos = {}, ()
    if kind in ("eos", "ignore_eos"):
        eos = (stop_tok,)
        kw["ignore_eos"] = kind == "ignore_eos"
    if kind == "stop_id":
        kw["stop_token_ids"] = (stop_tok,)
    sched = Scheduler(cfg(), eos_ids=eos)
    seq = run_all(sched, [req("r", prompt, 7 if kind == "max_tokens" else 12, **kw)])[0]
    if kind in ("eos", "stop_id"):
        assert seq.output_ids() == upto and seq.finish_reason == "stop"
    elif kind == "max_tokens":
        assert seq.output_ids() == full[:7] and seq.finish_reason == "length"
    else:
        assert seq.output_ids() == full and seq.finish_reason == "length"
    assert sched.kv.num_used == 0


def test_context_limit_stops_with_length():
    sched = Scheduler(cfg())
    r = req("r", [1, 2, 3], 10)
    seq = sched.add_request(r, seed=0)[0]
    seq.max_len = 8  # a context limit below prompt + max_tokens
    drive(sched, FakeDevice(sched, V))
    assert seq.output_ids() == expected_tokens([1, 2, 3], 5, V)
    assert seq.finish_reason == "length"


def test_eos_stops_on_device_before_the_host_reads_it(decode_steps):
    prompt = [11, 12, 13]
    eos = expected_tokens(prompt, 3, V)[2]
    sched = Scheduler(cfg(), eos_ids=(eos,))
    seq = sched.add_request(req("r", prompt, 20), seed=0)[0]
    dev = FakeDevice(sched, V)
    carried = []
    drive(sched, dev, on_step=lambda o: carried.append(seq in o.decode_seqs))
    assert seq.output_ids() == expected_tokens(prompt, 3, V)
    assert seq.finish_reason == "stop"
    if decode_steps == 1:
        # prefill samples token 1, decodes sample 2 and 3 (EOS); one more decode is in flight
        # before the host sees the EOS: the device had stopped the row, so it returns nothing.
        assert sum(carried) == 3
    else:
        # one dispatch of 4 decodes tokens 2 and 3 and stops at the EOS on device.
        assert sum(carried) <= 2


def test_multi_step_only_without_waiting_prefill(decode_steps):
    """Decode-only steps run decode_steps tokens; a step a prefill chunk joins runs one."""
    sched = Scheduler(cfg())
    dev = FakeDevice(sched, V)
    seen = []

    def on_step(out):
        seen.append((out.num_steps, bool(out.prefill_seqs), bool(out.decode_seqs)))
        if out.step == 5:
            sched.add_request(req("late", [3] * 10, 6), seed=0)

    sched.add_request(req("early", [1, 2, 3], 30), seed=0)
    drive(sched, dev, on_step=on_step)
    for num_steps, has_prefill, has_decode in seen:
        if has_prefill or not has_decode:
            assert num_steps == 1
    decode_only = [n for n, p, d in seen if d and not p]
    assert decode_only and all(n == decode_steps for n in decode_only)
    assert set(dev.decode_dispatches) <= {1, decode_steps}


def test_stops_inside_a_multi_step_run_are_exact():
    """EOS, stop ids and max_tokens landing mid-dispatch give exactly the one-step tokens."""
    prompt = [5, 6, 7, 8]
    full = expected_tokens(prompt, 30, V)
    results = {}
    for steps in (1, 8):
        out = []
        for k, kw, eos in [("eos", {}, (full[5],)), ("stop_id", {"stop_token_ids": (full[10],)},
                                                      ()),
                           ("max", {}, ()), ("ignore", {"ignore_eos": True}, (full[3],))]:
            sched = Scheduler(cfg(decode_steps=steps), eos_ids=eos)
            seq = run_all(sched, [req(k, prompt, 13 if k == "max" else 20, **kw)])[0]
            out.append((seq.output_ids(), seq.finish_reason))
            assert sched.kv.num_used == 0
        results[steps] = out
    assert results[1] == results[8]
    assert results[1][0] == (full[:6], "stop") and results[1][1] == (full[:11], "stop")
    assert results[1][2] == (full[:13], "length") and results[1][3] == (full[:20], "length")


def test_deadline_and_external_finish_free_pages():
    sched = Scheduler(cfg())
    now = time.monotonic()
    late = sched.add_request(req("late", [1, 2], 50, deadline=now + 1000), seed=0)[0]
    gone = sched.add_request(req("gone", [1, 2], 50, deadline=now - 1), seed=0)[0]
    out = sched.schedule(now)
    assert gone in out.finished and gone.finish_reason == "deadline"
    dev = FakeDevice(sched, V)
    res = dev.step(out)
    out2 = sched.schedule(now)
    res2 = dev.step(out2)
    sched.update_from_output(out, *res)
    assert sched.kv.num_used > 0 and late.num_generated == 1
    assert sched.finish(late, "cancelled") and not sched.finish(late, "cancelled")
    assert sched.kv.num_used == 0 and late.finish_reason == "cancelled"
    assert sched.update_from_output(out2, *res2) == []  # the in-flight step is discarded
    out = sched.schedule(now + 2000)
    assert not out.has_work
    sched.check()


def test_random_workloads_keep_accounting_exact():
    rng = random.Random(0)
    preemptions = hits = 0
    for trial in range(6):
        sched = Scheduler(cfg(num_pages=rng.choice([16, 24, 64])), eos_ids=(rng.randrange(V),))
        dev = FakeDevice(sched, V)
        prompts = {}
        cancel_at = {}

        def on_step(out, sched=sched, prompts=prompts, cancel_at=cancel_at, trial=trial):
            if out.step < 40 and rng.random() < 0.5:
                shared = [9, 9, 9, 9, 8, 8, 8, 8] if rng.random() < 0.5 else []
                p = shared + [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
                r = req(f"{trial}-{out.step}", p, rng.randrange(1, 20),
                        n=rng.choice([1, 1, 2]), priority=rng.randrange(3))
                for s in sched.add_request(r, seed=0):
                    prompts[s.seq_id] = (s, p)
                if rng.random() < 0.2:
                    cancel_at[out.step + rng.randrange(1, 6)] = r.request_id
            rid = cancel_at.pop(out.step, None)
            if rid is not None:
                for s, _ in list(prompts.values()):
                    if s.request.request_id == rid:
                        sched.finish(s, "cancelled")

        drive(sched, dev, on_step=on_step, min_steps=45)
        assert len(prompts) > 10 and sched.step_id >= 45
        assert sched.kv.num_used == 0 and not sched.has_unfinished()
        sched.check()
        eos = next(iter(sched.eos_ids))
        for s, p in prompts.values():
            want = expected_tokens(p, s.request.max_tokens, V, stop=eos.__eq__)
            got = s.output_ids()
            if s.finish_reason == "cancelled":
                assert got == want[: len(got)]
            else:
                assert got == want, (s, p)
        preemptions += sched.num_preemptions
        hits += sched.kv.hit_tokens
    assert preemptions > 0 and hits > 0  # the workloads did exercise both


def test_64_running_sequences_decode_together():
    """64 sequences admitted in chunks all end up in one decode batch of 64 (the shape the
    host-time benchmark times; timing itself is measured by benchmarks, not tests)."""
    c = EngineConfig(page_size=16, num_pages=4096, max_seq_len=2048)
    sched = Scheduler(c)
    dev_tokens = np.zeros((c.decode_steps, 64), np.int64)
    for i in range(64):
        sched.add_request(req(i, [i % 200 + 1] * 128, 1900), seed=0)
    pending = None
    full = 0
    for _ in range(200):
        out = sched.schedule()
        if pending is not None:
            sched.update_from_output(pending, dev_tokens, dev_tokens[0])
        pending = out
        full += len(out.decode_seqs) == 64 and out.num_steps == c.decode_steps
        if full == 3:
            break
    assert full == 3
    sched.check()


def test_adaptive_depth_follows_measured_costs_and_acceptance():
    """SpecPlan.choose rates each tier by expected tokens per second; served steps' measured
    costs overrule the warm-up's (a tier timed cheap but slow when served loses its rows)."""
    from jaxinfer.engine.spec_plan import SPEC_MARGIN, SpecPlan, expected_tokens

    assert expected_tokens(0.5, 3) == 1 + 0.5 + 0.25 + 0.125
    assert expected_tokens(1.0, 3) == 4.0 and expected_tokens(0.9, 0) == 1.0
    plan = SpecPlan(tiers=(0, 1, 3), adaptive=True, plain_steps=4,
                    costs={(0, 8): 4.0, (1, 8): 1.1, (3, 8): 1.5})
    prior = plan.acceptance(0.0, 0.0)  # a new row, before the engine has speculated
    assert prior >= 0.75  # optimistic, so the engine tries
    assert plan.choose([(prior, 0)] * 8, 8) == 3  # 2.95 tokens / 1.5 s beats 4 / 4 s
    assert plan.choose([(0.0, 0)] * 8, 8) == 0  # nothing kept: plain decoding
    for _ in range(20):  # served k = 3 steps cost 4 s each: plain wins even at the prior
        plan.observe(3, 8, 4.0)
        plan.observe(1, 8, 4.0)
    assert abs(plan.costs[(3, 8)] - 4.0) < 0.05
    assert plan.choose([(prior, 0)] * 8, 8) == 0
    plan.observe(2, 16, 0.3)  # a shape never timed starts at its first measurement
    assert plan.costs[(2, 16)] == 0.3
    # Near break-even plain decoding wins: a tier must promise SPEC_MARGIN more.
    even = SpecPlan(tiers=(0, 1), adaptive=True, plain_steps=1,
                    costs={(0, 1): 1.0, (1, 1): 1.5 * SPEC_MARGIN ** 0.5})
    assert even.choose([(0.5, 0)], 1) == 0  # 1.5 tokens for 1.5 * 1.015 s


def test_adaptive_acceptance_is_learned_engine_wide():
    """One speculative step of a full batch teaches the pool; a new row starts from the pool
    (not from the optimistic prior); rows behind their proposer's catch-up count one token;
    after many plain dispatches the pool drifts back and the engine tries again."""
    from jaxinfer.engine.spec_plan import SpecPlan

    costs = {(0, 32): 4 * 1.0, (3, 32): 2.3, (7, 32): 2.56}  # plain: 4 tokens per dispatch
    plan = SpecPlan(tiers=(0, 3, 7), adaptive=True, plain_steps=4, costs=costs, catch_up=8)
    assert plan.choose([(plan.acceptance(0, 0), 0)] * 32, 32) == 7  # optimistic start
    # Each of 32 rows kept 1 of 7 drafts and rejected one: acceptance 0.5 on this traffic.
    plan.record([(7, 1)] * 32 + [(0, 0)] * 5)  # rows that proposed nothing say nothing
    assert abs(plan.pool_acceptance - 0.5) < 0.03
    own = [(plan.acceptance(0.9, 0.9), 0)] * 31  # rows with their own evidence
    new = (plan.acceptance(0.0, 0.0), 0)  # a row admitted now starts at the pool
    assert abs(new[0] - plan.pool_acceptance) < 1e-9
    assert plan.choose(own + [new], 32) == 0
    # High acceptance, but every row lags its draft model by more than it catches up.
    assert plan.choose([(0.95, 8)] * 32, 32) == 0
    assert plan.choose([(0.95, 7)] * 32, 32) == 7
    for n in range(1, 400):
        plan.relax()
        if plan.choose([(plan.acceptance(0, 0), 0)] * 32, 32):
            break
    assert 30 < n < 200, n  # explores again, but not at once
