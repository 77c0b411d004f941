"""Data-parallel serving: `--mesh dp=2` builds two engine replicas on their own devices that
serve as one (CPU, 8 fake devices, the `dummy` preset)."""

import threading

import pytest

from jaxinfer.errors import ConfigError, RequestError
from serve.__main__ import build_engine, build_parser, engine_config
from serve.replicas import ReplicatedEngine, SummedStateMetrics
from serve.types import Request

FLAGS = ["--model", "dummy", "--page-size", "4", "--num-pages", "24", "--max-seq-len", "64",
         "--dtype", "float32", "--max-num-batched-tokens", "16", "--serve-decode-buckets", "2,4",
         "--serve-prefill-buckets", "8,16", "--serve-prefill-rows", "1,2", "--max-n", "2"]
PROMPTS = [[(7 * i + j) % 50 + 3 for j in range(5 + 3 * i)] for i in range(8)]


def _engine(mesh: str):
    args = build_parser().parse_args(FLAGS + ["--mesh", mesh])
    eng = build_engine(args, engine_config(args, default_dtype="float32"), max_queue=16)
    eng.warmup(progress=False)
    eng.start()
    return eng


def _run(eng, prompts, max_tokens=6) -> list[list[int]]:
    done = [threading.Event() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]

    def callback(i):
        def on_output(out):
            tokens[i].extend(out.token_ids)
            if out.finish_reason is not None:
                done[i].set()
        return on_output

    for i, p in enumerate(prompts):
        eng.submit(Request(request_id=f"r{i}", prompt_ids=p, max_tokens=max_tokens,
                           ignore_eos=True), callback(i))
    for d in done:
        assert d.wait(60)
    return tokens


@pytest.fixture(scope="module")
def engines():
    one, two = _engine("dp=1"), _engine("dp=2")
    yield one, two
    one.stop()
    two.stop()


def test_two_replicas_serve_the_one_device_tokens(engines):
    one, two = engines
    assert isinstance(two, ReplicatedEngine) and len(two.replicas) == 2
    devices = [tuple(r.mesh.devices.flat) for r in two.replicas]
    assert devices[0] != devices[1]  # each replica on its own device
    want = _run(one, PROMPTS)
    assert _run(two, PROMPTS) == want
    # Both replicas did work, and every page came back.
    steps = [r.stats()["steps"] for r in two.replicas]
    assert all(s > 0 for s in steps), steps
    assert two.drain(30)
    assert all(r.scheduler.kv.num_used == 0 for r in two.replicas)


def test_info_and_stats_cover_the_whole_server(engines):
    _, two = engines
    info = two.info()
    assert info["mesh"]["dp"] == 2 and len(info["mesh"]["devices"]) == 2
    assert info["limits"]["num_pages"] == 48 and info["limits"]["max_running"] == 8
    assert two.stats()["replicas"] == 2 and two.num_recompiles == 0


def test_pipeline_mesh_is_refused_with_a_reason():
    args = build_parser().parse_args(FLAGS + ["--mesh", "dp=2,pp=2"])
    with pytest.raises(ConfigError, match="pp=2"):
        build_engine(args, engine_config(args, default_dtype="float32"), max_queue=4)


def test_duplicate_id_across_replicas_is_rejected():
    class Fake:
        tokenizer = None

        def __init__(self, ids):
            self.ids, self.got = set(ids), []

        def in_flight(self, rid):
            return rid in self.ids

        def num_in_flight(self):
            return len(self.ids)

        def submit(self, req, cb):
            self.got.append(req.request_id)
            self.ids.add(req.request_id)

    a, b = Fake({"x"}), Fake(set())
    eng = ReplicatedEngine([a, b])
    with pytest.raises(RequestError, match="already in flight"):
        eng.submit(Request(request_id="x", prompt_ids=[1], max_tokens=1), print)
    eng.submit(Request(request_id="y", prompt_ids=[1], max_tokens=1), print)
    eng.submit(Request(request_id="z", prompt_ids=[1], max_tokens=1), print)
    assert b.got == ["y"] and a.got == ["z"]  # least loaded first, ties to the lower index


def test_state_gauges_are_summed_over_replicas():
    seen = []

    class Sink:
        def set_state(self, **kw):
            seen.append(kw)

        def observe_ttft(self, s):
            seen.append(("ttft", s))

    v0, v1 = SummedStateMetrics.views(Sink(), 2)
    v0.set_state(queued=1, running=2, batch_occupancy=0.5, pages_used=3, pages_free=5)
    v1.set_state(queued=4, running=1, batch_occupancy=0.25, pages_used=1, pages_free=7)
    assert seen[-1] == dict(queued=5, running=3, batch_occupancy=0.375, pages_used=4,
                            pages_free=12)
    v1.observe_ttft(0.1)
    assert seen[-1] == ("ttft", 0.1)
