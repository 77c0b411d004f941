"""Speculative decoding served: speculating greedy and sampling requests under concurrency on a
tight page pool (preemption), a stop string inside an accepted run, cancel, the spec_decode
counters and ServerInfo, zero recompiles (trained models of ../shared/models)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pbg
from tests.serve import server_harness as harness

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
TARGET, DRAFT = MODELS / "stories260K-hf", MODELS / "llama2xs-281K-hf"
SPEC = f'{{"method": "draft_model", "model": "{DRAFT}", "num_speculative_tokens": 3}}'

pytestmark = pytest.mark.skipif(not (TARGET / "config.json").exists()
                                or not (DRAFT / "config.json").exists(),
                                reason=f"{MODELS} not present")


@pytest.fixture(scope="module")
def served():
    import jax

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.core import EngineCore
    from jaxinfer.engine.llm import LLM
    from jaxinfer.model_loader import load_model
    from serve.engine_client import EngineClient
    from serve.metrics import PrometheusMetrics
    from sharding.mesh import make_mesh

    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model(str(TARGET), mesh=mesh, dtype="float32")
    common = dict(page_size=16, max_seq_len=128, dtype="float32", batch_buckets=(8,),
                  prefill_buckets=(16,), prefill_rows=(4,), max_num_batched_tokens=96,
                  decode_steps=1)
    # 14 pages of 16 tokens for up to 8 running sequences of ~70 tokens: preemption.
    spec_cfg = EngineConfig(num_pages=14, speculative_config=SPEC, **common)
    metrics = PrometheusMetrics()
    engine = EngineClient.in_process([EngineCore.create(loaded, spec_cfg, mesh=mesh)],
                                     tokenizer=loaded.tokenizer, max_queue=64, metrics=metrics)
    bg = harness.BackgroundServer(engine, metrics=metrics)
    plain = LLM.from_loaded(loaded, EngineConfig(num_pages=64, **common), mesh=mesh)
    yield bg, engine, metrics, loaded.tokenizer, plain
    bg.close()


def _generate(stub, prompt, **sampling):
    msgs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                                 sampling=pb.SamplingParams(**sampling)),
                              timeout=120))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs[-1]


def test_speculating_requests_under_concurrency_match_plain_decoding(served):
    bg, engine, metrics, tok, plain = served
    texts = ["Once upon a time", "The dog ran", "Lily had a red ball", "One day, a bird",
             "Tom was sad", "The sun was hot", "Sam and his mom", "A big fish"]
    prompts = [tok.encode(t) for t in texts]
    want = [c[0].token_ids for c in plain.generate(
        [plain.request(p, max_tokens=60) for p in prompts])]
    got: dict[int, list[int]] = {}
    errors = []

    def run(i, stub):
        try:
            if i < len(prompts):  # greedy: exactly plain decoding
                got[i] = _generate(stub, prompts[i], max_tokens=60)[0]
            else:  # sampling rows beside them, seeded
                got[i] = _generate(stub, prompts[i % 8], max_tokens=40, temperature=0.8,
                                   seed=i)[0]
        except grpc.RpcError as e:
            errors.append((i, e.code(), e.details()))

    with bg.channel() as ch:
        stub = pbg.GenerationStub(ch)
        threads = [threading.Thread(target=run, args=(i, stub)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors, errors
    assert [got[i] for i in range(8)] == want
    assert all(len(got[i]) >= 1 for i in range(8, 12))
    stats = engine.stats()
    assert stats["preemptions"] > 0  # the pool is too small for all of them at once
    assert engine.num_recompiles == 0
    text = metrics.render().decode()
    for name in ("jaxinfer_spec_decode_num_drafts_total",
                 "jaxinfer_spec_decode_num_draft_tokens_total",
                 "jaxinfer_spec_decode_num_accepted_tokens_total",
                 'jaxinfer_spec_decode_num_accepted_tokens_per_pos_total{position="0"}'):
        line = next(x for x in text.splitlines() if x.startswith(name))
        assert float(line.split()[-1]) > 0, line
    with bg.channel() as ch:
        info = pbg.GenerationStub(ch).ServerInfo(pb.ServerInfoRequest(), timeout=30)
    spec = json.loads(info.engine_json)["speculative"]
    assert spec["method"] == "draft_model" and spec["num_speculative_tokens"] == 3


def test_stop_string_inside_an_accepted_run_and_cancel(served):
    bg, engine, _, tok, plain = served
    prompt = tok.encode("Once upon a time")
    full = plain.generate([plain.request(prompt, max_tokens=60)])[0][0].text
    stop = full[len(full) // 2: len(full) // 2 + 6]
    with bg.channel() as ch:
        stub = pbg.GenerationStub(ch)
        _, text, last = _generate(stub, prompt, max_tokens=60, stop=[stop])
        assert text == full[: full.index(stop)]
        assert last.finish_reason == pb.FINISH_REASON_STOP
        call = stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt),
            sampling=pb.SamplingParams(max_tokens=100, ignore_eos=True)), timeout=60)
        next(call)
        call.cancel()
        deadline = time.monotonic() + 30
        while engine.stats()["pages_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["pages_used"] == 0
