"""Serving on meshes (CPU, 8 fake devices, the `dummy` preset): `--mesh dp=2,tp=2` starts two
engine-core processes on devices of their own that serve as one; `pp=2` and `pp=2,tp=2` run
one pipelined core. Every mesh serves the tokens one device serves."""

import threading

import pytest

from jaxinfer.engine.request import Request
from jaxinfer.errors import RequestError
from serve.__main__ import build_engine, build_parser, engine_config

# One batch bucket, one prefill shape, 4-token decode dispatches: 5 programs per core.
FLAGS = ["--model", "dummy", "--page-size", "4", "--num-pages", "24", "--max-seq-len", "64",
         "--dtype", "float32", "--max-num-batched-tokens", "32", "--batch-buckets", "4",
         "--prefill-buckets", "16", "--prefill-rows", "2", "--decode-steps", "4",
         "--max-n", "2", "--log-level", "WARNING"]
PROMPTS = [[(7 * i + j) % 50 + 3 for j in range(5 + 3 * i)] for i in range(8)]


class Sink:
    """Records the state gauges the front reports."""

    def __init__(self):
        self.states = []

    def set_state(self, **kw):
        self.states.append(kw)

    def __getattr__(self, name):  # every other metric: ignored
        return lambda *a, **k: None


def _engine(mesh: str, *, in_process: bool, metrics=None):
    extra = ["--engine-in-process"] if in_process else []
    args = build_parser().parse_args(FLAGS + ["--mesh", mesh] + extra)
    eng = build_engine(args, engine_config(args, default_dtype="float32"), max_queue=16,
                       metrics=metrics)
    eng.warmup(progress=False)
    eng.start()
    return eng


def _run(eng, prompts, max_tokens=6, prefix="r") -> list[list[int]]:
    done = [threading.Event() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]

    def callback(i):
        def on_output(out):
            tokens[i].extend(out.token_ids)
            if out.finish_reason is not None:
                done[i].set()
        return on_output

    for i, p in enumerate(prompts):
        eng.submit(Request(request_id=f"{prefix}{i}", prompt_ids=p, max_tokens=max_tokens,
                           ignore_eos=True), callback(i))
    for d in done:
        assert d.wait(120)
    return tokens


@pytest.fixture(scope="module")
def one():
    eng = _engine("dp=1", in_process=True)
    yield eng, _run(eng, PROMPTS)
    eng.stop()


@pytest.fixture(scope="module")
def two():
    sink = Sink()
    eng = _engine("dp=2,tp=2", in_process=False, metrics=sink)
    eng.sink = sink
    yield eng
    eng.stop()


def test_two_replica_processes_serve_the_one_device_tokens(one, two):
    _, want = one
    assert _run(two, PROMPTS) == want
    info = two.info()
    pids = info["engine_pids"]
    assert len(set(pids)) == 2 and all(p for p in pids)  # two engine-core processes
    # Both replicas did work; every page came back; the gauges are the sums over replicas.
    assert all(r.stats.get("steps", 0) > 0 for r in two._replicas)
    assert two.drain(30)
    _wait(lambda: two.stats()["pages_used"] == 0)
    assert two.sink.states[-1]["pages_free"] == 48 and two.sink.states[-1]["running"] == 0


def test_info_and_stats_cover_the_whole_server(two):
    info = two.info()
    assert info["mesh"]["dp"] == 2 and len(info["mesh"]["devices"]) == 4
    assert info["mesh"]["tp"] == 2
    assert info["limits"]["num_pages"] == 48 and info["limits"]["max_running"] == 8
    assert two.stats()["replicas"] == 2 and two.num_recompiles == 0


@pytest.mark.slow  # pp engines: tests/sharding/test_parallel_generate.py in the gate
@pytest.mark.parametrize("mesh", ["pp=2", "pp=2,tp=2"])
def test_pipeline_meshes_serve_the_one_device_tokens(one, mesh):
    _, want = one
    eng = _engine(mesh, in_process=True)
    try:
        assert _run(eng, PROMPTS) == want
        assert eng.info()["mesh"]["pp"] == 2 and eng.num_recompiles == 0
    finally:
        eng.stop()


def test_duplicate_id_in_flight_is_rejected(one):
    eng, _ = one
    done = threading.Event()
    eng.submit(Request(request_id="dup", prompt_ids=[1, 2], max_tokens=30, ignore_eos=True),
               lambda out: out.finish_reason and done.set())
    with pytest.raises(RequestError, match="already in flight"):
        eng.submit(Request(request_id="dup", prompt_ids=[1], max_tokens=1), print)
    assert done.wait(60)


def _wait(cond, timeout=20.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met"
        time.sleep(0.05)
