"""JetStream compatibility: the wire format against JetStream's published field numbers, and a
JetStream client - stubs generated here from our proto under JetStream's own module path
(`jetstream.core.proto.jetstream_pb2`), used the way JetStream's benchmark_serving.py uses them -
streaming the right tokens from the shared real-engine server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from serve.protos import jetstream_pb2 as js
from serve.protos import jetstream_pb2_grpc as jsg
from tests.serve import server_harness as harness

REPO = Path(__file__).resolve().parents[2]

# JetStream's jetstream/core/proto/jetstream.proto: message -> {field: number}
PUBLISHED = {
    "DecodeRequest": {"max_tokens": 4, "text_content": 5, "token_content": 6, "metadata": 7,
                      "num_samples": 8, "lora_adapter_id": 9, "has_bos": 10},
    "DecodeRequest.TextContent": {"text": 1},
    "DecodeRequest.TokenContent": {"token_ids": 1},
    "DecodeRequest.Metadata": {"start_time": 1},
    "DecodeResponse": {"initial_content": 2, "stream_content": 3},
    "DecodeResponse.StreamContent": {"samples": 1},
    "DecodeResponse.StreamContent.Sample": {"text": 1, "token_ids": 2},
    "HealthCheckRequest": {},
    "HealthCheckResponse": {"is_live": 1},
}


def test_field_numbers_match_jetstream():
    for path, fields in PUBLISHED.items():
        desc = js.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
        for part in path.split(".")[1:]:
            desc = desc.nested_types_by_name[part]
        assert {f.name: f.number for f in desc.fields} == fields, path
    req = js.DESCRIPTOR.message_types_by_name["DecodeRequest"]
    assert {o.name: sorted(f.name for f in o.fields) for o in req.oneofs} == {
        "content": ["text_content", "token_content"], "metadata_optional": ["metadata"]}
    service = js.DESCRIPTOR.services_by_name["Orchestrator"]
    assert service.full_name == "jetstream_proto.Orchestrator"
    assert service.methods_by_name["Decode"].server_streaming
    assert not service.methods_by_name["HealthCheck"].server_streaming


@pytest.fixture(scope="module")
def real(request):
    return harness.shared_real_server(request.config)


@pytest.fixture(scope="module")
def jetstream_pkg(tmp_path_factory) -> Path:
    """Our proto compiled by grpc_tools into <tmp>/jetstream/core/proto, JetStream's layout."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    root = tmp_path_factory.mktemp("jetstream_client")
    src = root / "src" / "jetstream" / "core" / "proto"
    src.mkdir(parents=True)
    shutil.copy(REPO / "serve/protos/jetstream.proto", src / "jetstream.proto")
    out = root / "out"
    out.mkdir()
    include = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{root / 'src'}", f"-I{include}",
                      f"--python_out={out}", f"--grpc_python_out={out}",
                      str(src / "jetstream.proto")])
    assert rc == 0
    for pkg in ("jetstream", "jetstream/core", "jetstream/core/proto"):
        (out / pkg / "__init__.py").touch()
    return out


# The request/stream loop of JetStream's benchmark_serving.py (grpc_async_request and
# send_request), in a fresh process that only has the generated stubs.
_CLIENT = r'''
import asyncio, json, sys, time
import grpc
from jetstream.core.proto import jetstream_pb2
from jetstream.core.proto import jetstream_pb2_grpc

async def one(api_url, request):
    options = [("grpc.keepalive_timeout_ms", 10000)]
    async with grpc.aio.insecure_channel(api_url, options=options) as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        response = stub.Decode(request)
        token_list, texts, shapes = [], [], []
        async for resp in response:
            resp_tokens = resp.stream_content.samples[0].token_ids
            token_list.extend(resp_tokens)
            texts.append(resp.stream_content.samples[0].text)
            shapes.append([len(s.token_ids) for s in resp.stream_content.samples])
        health = await stub.HealthCheck(jetstream_pb2.HealthCheckRequest())
        return {"tokens": token_list, "text": "".join(texts), "shapes": shapes,
                "is_live": health.is_live}

async def main(api_url, cases):
    reqs = []
    for case in cases:
        kw = dict(max_tokens=case["max_tokens"],
                  metadata=jetstream_pb2.DecodeRequest.Metadata(start_time=time.perf_counter()))
        if "ids" in case:
            kw["token_content"] = jetstream_pb2.DecodeRequest.TokenContent(token_ids=case["ids"])
        else:
            kw["text_content"] = jetstream_pb2.DecodeRequest.TextContent(text=case["text"])
        if case.get("num_samples"):
            kw["num_samples"] = case["num_samples"]
        reqs.append(jetstream_pb2.DecodeRequest(**kw))
    results = await asyncio.gather(*(one(api_url, r) for r in reqs))
    print(json.dumps(results))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
'''


def _run_client(pkg: Path, target: str, cases: list[dict]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(pkg))  # only the generated stubs, not serve/
    r = subprocess.run([sys.executable, "-c", _CLIENT, target, json.dumps(cases)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_jetstream_client_streams_offline_tokens(real, jetstream_pkg):
    tok = real.tokenizer
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44], [7] * 20]
    text = "Hello world"
    cases = [{"ids": p, "max_tokens": 10} for p in prompts]
    cases.append({"text": text, "max_tokens": 8})
    cases.append({"ids": prompts[0], "max_tokens": 6, "num_samples": 2})
    results = _run_client(jetstream_pkg, real.bg.target, cases)
    want = real.offline(prompts + [tok.encode(text)], 10)
    for res, w in zip(results[:3], want[:3]):
        assert res["tokens"] == w[:10]
        assert res["text"] == ""  # token ids in, token ids out (client-side tokenization)
        assert res["is_live"] and len(res["shapes"]) > 1  # streamed
        assert all(len(shape) == 1 and shape[0] > 0 for shape in res["shapes"])  # none empty
    text_res = results[3]
    assert text_res["tokens"] == want[3][:8]
    assert text_res["text"] == tok.decode(text_res["tokens"])
    two = results[4]
    assert all(len(shape) == 2 for shape in two["shapes"])
    assert two["tokens"] == want[0][:6]  # greedy: sample 0 is the offline tokens
    assert sum(shape[1] for shape in two["shapes"]) == 6


def test_jetstream_bad_requests(real):
    with real.bg.channel() as ch:
        stub = jsg.OrchestratorStub(ch)
        cases = [
            (js.DecodeRequest(max_tokens=4), "content"),
            (js.DecodeRequest(max_tokens=4, token_content=js.DecodeRequest.TokenContent(
                token_ids=[1]), lora_adapter_id="x"), "LoRA"),
            (js.DecodeRequest(max_tokens=-1, token_content=js.DecodeRequest.TokenContent(
                token_ids=[1])), "max_tokens"),
            (js.DecodeRequest(max_tokens=4, token_content=js.DecodeRequest.TokenContent(
                token_ids=[100000])), "vocabulary"),
            (js.DecodeRequest(max_tokens=4, text_content=js.DecodeRequest.TextContent(text="")),
             "empty"),
            (js.DecodeRequest(max_tokens=4, num_samples=100000,
                              token_content=js.DecodeRequest.TokenContent(token_ids=[1])),
             "num_samples"),
            (js.DecodeRequest(max_tokens=harness.MAX_SEQ_LEN - 5,
                              token_content=js.DecodeRequest.TokenContent(token_ids=[1] * 10)),
             "context limit"),
        ]
        for req, match in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Decode(req, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
            assert match in info.value.details()
        assert stub.HealthCheck(js.HealthCheckRequest(), timeout=10).is_live
