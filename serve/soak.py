"""`python -m serve.soak`: a soak and chaos harness for a running `python -m serve` (or one it
starts itself), over gRPC and the OpenAI HTTP API at once.

    python -m serve.soak --target 127.0.0.1:50051 --http-url http://127.0.0.1:8000 \
        --requests 5000 --concurrency 1000 --duration 600
    python -m serve.soak --requests 300 --concurrency 200 --sigterm -- --model demo ...

(after `--`: the flags of a `python -m serve` that the harness starts on free ports, stops,
and whose exit code it checks).

Phases: (1) reference: each of `--prompts` random token-id prompts is run once, alone
(greedy, `ignore_eos`, `--max-tokens`); (2) warm-up: one wave of plain requests, then the
server's RSS (front and engine cores, from /proc) is the baseline; (3) soak: `--requests`
requests, at most `--concurrency` at once, until `--duration` seconds have passed, each of a
kind drawn by its share (`--mix`): plain gRPC streams, unary calls and HTTP streams, clients
that cancel at a random point, that disconnect without cancelling (gRPC: close the channel;
HTTP: drop the connection), slow readers (one message per `--slow-interval`), clients that
stop reading altogether (held until the phase ends), short deadlines, and malformed requests;
(4) stalled: `--stalled-requests` plain streams (`--stalled-concurrency` at once) are timed
alone, then again beside `--stalled` clients that stopped reading once the server has
generated their tokens; (5) burst: `--burst` x max_queue requests at once while a process
of its own times health checks; (6) idle: the server's /metrics must show nothing running or waiting and no KV page
held; (7, with `--sigterm`) drain: SIGTERM while `--drain-streams` streams run.

Checks (each a JSON line with `"check"` and `"ok"`; exit 1 with a one-line reason when one
fails): every request that was not cancelled completes with the reference's tokens (gRPC: the
ids; HTTP: the text and the count), none is lost (no outcome, a stream without its finish or
[DONE]) or answered twice (a message after the finish), every status is one its kind may end
with (`EXPECTED`), RSS grows at most `--max-rss-growth` over the baseline, health answered
within `--health-slo` s during the burst, TTFT p99 beside the stalled clients is at most
`--stalled-ttft-ratio` times TTFT p99 without them, the metrics are idle afterwards, and
(drain) every stream in flight at SIGTERM finished or ended UNAVAILABLE, new requests were
refused with UNAVAILABLE / 503 (or a closed port), and the process exited 0.

Output (STYLE.md rule 17): one JSON object per metric and per check on stdout, a table on
stderr. Exit codes: 0 every check passed; 1 a check failed or the server could not be used;
2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from queue import Empty

import grpc

from serve import soak_clients as sc
from serve.loadgen import connect
from serve.loadgen_types import ServerError
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pbg

PROG = "python -m serve.soak"
# The statuses each kind of request may end with (anything else is an unexpected code), as
# README.md and docs/http_api.md document them. RESOURCE_EXHAUSTED / 429: the queue was full.
_BUSY = {"RESOURCE_EXHAUSTED"}
EXPECTED = {
    "grpc_stream": {"OK"} | _BUSY,
    "grpc_unary": {"OK"} | _BUSY,
    "http_stream": {"OK", "HTTP 429"},
    "grpc_cancel": {"OK", "CANCELLED"} | _BUSY,
    "grpc_disconnect": {"OK", "DISCONNECTED"} | _BUSY,
    "http_disconnect": {"OK", "DISCONNECTED", "HTTP 429"},
    "grpc_slow": {"OK"} | _BUSY,
    "http_slow": {"OK", "HTTP 429"},
    "grpc_stalled": {"OK", "CANCELLED"} | _BUSY,
    "http_stalled": {"STALLED"},
    "grpc_deadline": {"OK", "DEADLINE_EXCEEDED"} | _BUSY,
    "grpc_malformed": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "http_malformed": {"HTTP 400", "HTTP 404"},
}
# Kinds whose completed answers must equal the reference (the rest are cut short on purpose
# or send no valid request); a cut-short one must still be a prefix of it.
CHECKED = {"grpc_stream", "grpc_unary", "http_stream", "grpc_slow", "http_slow",
           "grpc_deadline", "grpc_cancel", "grpc_disconnect", "grpc_stalled",
           "http_disconnect"}
DEFAULT_MIX = ("grpc_stream=30,grpc_unary=10,http_stream=15,grpc_cancel=10,grpc_disconnect=5,"
               "http_disconnect=5,grpc_slow=3,http_slow=2,grpc_stalled=2,http_stalled=2,"
               "grpc_deadline=6,grpc_malformed=5,http_malformed=5")


class UsageError(Exception):
    pass


class CheckFailed(Exception):
    pass


# -- the workload ----------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, share = part.partition("=")
        if name not in EXPECTED:
            raise UsageError(f"--mix: unknown kind {name!r}; kinds: {', '.join(EXPECTED)}")
        try:
            mix[name] = float(share)
        except ValueError:
            raise UsageError(f"--mix: {part!r} is not KIND=SHARE") from None
        if mix[name] < 0:
            raise UsageError(f"--mix: {name}'s share must be >= 0")
    if not sum(mix.values()) > 0:
        raise UsageError("--mix: give at least one kind a positive share")
    return mix


MAX_PROMPT = 24  # tokens of the longest prompt `make_prompts` makes


def make_prompts(rng: random.Random, n: int, vocab: int, special: Sequence[int]
                 ) -> list[list[int]]:
    ids = [t for t in range(min(vocab, 4096)) if t not in set(special)]
    return [[rng.choice(ids) for _ in range(rng.randint(4, MAX_PROMPT))] for _ in range(n)]


def check_tokens(args: argparse.Namespace, limits) -> None:
    """Every token count asked for fits the server (else each such request would be refused
    and the phase would fail for the harness's sake, not the server's)."""
    most = min(int(limits.max_tokens) or 2**31, int(limits.max_seq_len) - MAX_PROMPT)
    for name in ("max_tokens", "stalled_tokens", "drain_tokens"):
        if getattr(args, name) > most:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is more than "
                             f"this server allows with a {MAX_PROMPT}-token prompt ({most}: "
                             f"max_tokens {limits.max_tokens}, max_seq_len "
                             f"{limits.max_seq_len})")


def malformed_grpc(rng: random.Random, limits, vocab_size: int) -> tuple[str, bytes]:
    """A request the server must refuse with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for one
    past --max-message-bytes); `limits` is ServerInfo's."""
    s = pb.SamplingParams
    bad = rng.choice([
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                           sampling=s(max_tokens=limits.max_seq_len + 1)),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[vocab_size + 7]),
                           sampling=s(max_tokens=2)),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=s(max_tokens=2,
                                                                      temperature=-1)),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=s(max_tokens=2,
                                                                      n=limits.max_n + 1)),
        pb.GenerateRequest(sampling=s(max_tokens=2)),  # no prompt
        b"\x12\xff\xff\xff\xff\x0f",  # a string field whose length runs past the end
        b"\x1a\x03\x08\x80",  # truncated varint in the token ids
        pb.GenerateRequest(text="x" * (limits.max_message_bytes + 16)),
    ])
    data = bad if isinstance(bad, bytes) else bad.SerializeToString()
    return "/jaxinfer.v1.Generation/GenerateUnary", data


def malformed_http(rng: random.Random, model: str) -> tuple[bytes, str, str]:
    """(body, content type, path) the server must answer 400 or 404."""
    return rng.choice([
        (b"{not json", "application/json", "/v1/completions"),
        (b"\xff\xfe\x00garbage", "application/json", "/v1/completions"),
        (json.dumps({"model": model, "prompt": [], "max_tokens": 2}).encode(),
         "application/json", "/v1/completions"),
        (json.dumps({"model": model, "prompt": "x", "max_tokens": "many"}).encode(),
         "application/json", "/v1/completions"),
        (json.dumps({"model": model, "prompt": "x", "temperature": -1}).encode(),
         "application/json", "/v1/completions"),
        (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), "application/json",
         "/v1/completions"),
        (json.dumps({"model": model, "messages": []}).encode(), "application/json",
         "/v1/chat/completions"),
    ])


class Soak:
    """One run: the server's addresses, the reference answers and every outcome so far."""

    def __init__(self, args: argparse.Namespace, summary, limits, channels, http,
                 model_name: str) -> None:
        self.args = args
        self.summary = summary
        self.model_name = model_name  # what HTTP requests name
        self.limits = limits
        self.channels = channels
        self.stubs = [pbg.GenerationStub(c) for c in channels]
        self.http = http  # (host, port) or None
        self.rng = random.Random(args.seed)
        self.prompts: list[list[int]] = []
        self.reference: list[tuple[list[int], str]] = []
        self.outcomes: list[sc.Outcome] = []
        self.hold = asyncio.Event()  # stalled clients wait on it

    def stub(self):
        return self.rng.choice(self.stubs)

    async def build_reference(self) -> None:
        self.prompts = make_prompts(self.rng, self.args.prompts, self.summary.vocab_size,
                                    self.summary.special_ids)
        for p in self.prompts:  # one at a time: the answer of a request alone
            out = await sc.grpc_unary(self.stubs[0], "reference", 0, p, self.args.max_tokens,
                                      timeout=self.args.request_timeout)
            if out.code != "OK" or len(out.token_ids) != self.args.max_tokens:
                raise ServerError(f"reference request failed: {out.code} {out.detail}")
            self.reference.append((out.token_ids, out.text))

    def run_kind(self, kind: str):
        a, i = self.args, self.rng.randrange(len(self.prompts))
        p, n, t = self.prompts[i], a.max_tokens, a.request_timeout
        host_port = self.http
        if kind == "grpc_stream":
            return sc.grpc_stream(self.stub(), kind, i, p, n, timeout=t)
        if kind == "grpc_unary":
            return sc.grpc_unary(self.stub(), kind, i, p, n, timeout=t)
        if kind == "grpc_cancel":
            return sc.grpc_stream(self.stub(), kind, i, p, n, timeout=t,
                                  read_at_most=self.rng.randint(1, 4))
        if kind == "grpc_disconnect":
            return sc.grpc_disconnect(a.target, kind, i, p, n, read=self.rng.randint(1, 4),
                                      timeout=t)
        if kind == "grpc_slow":
            return sc.grpc_stream(self.stub(), kind, i, p, n, timeout=t, pause=a.slow_interval)
        if kind == "grpc_stalled":
            return sc.grpc_stream(self.stub(), kind, i, p, n, timeout=t, hold=self.hold)
        if kind == "grpc_deadline":
            return sc.grpc_stream(self.stub(), kind, i, p, n,
                                  timeout=self.rng.uniform(0.02, 2.0))
        if kind == "grpc_malformed":
            method, data = malformed_grpc(self.rng, self.limits, self.summary.vocab_size)
            return sc.grpc_raw(self.rng.choice(self.channels), kind, method, data, timeout=t)
        host, port = host_port
        model = self.model_name
        if kind == "http_stream":
            return sc.http_stream(host, port, model, kind, i, p, n, timeout=t)
        if kind == "http_disconnect":
            return sc.http_stream(host, port, model, kind, i, p, n, timeout=t,
                                  read_at_most=self.rng.randint(1, 4))
        if kind == "http_slow":
            return sc.http_stream(host, port, model, kind, i, p, n, timeout=t,
                                  pause=a.slow_interval)
        if kind == "http_stalled":
            return sc.http_stalled(host, port, model, kind, i, p, n, hold=self.hold)
        body, ctype, path = malformed_http(self.rng, model)
        return sc.http_unary(host, port, kind, body, timeout=t, content_type=ctype, path=path)

    async def run_many(self, kinds: Sequence[str], *, concurrency: int,
                       until: float | None = None, release: bool = True) -> list[sc.Outcome]:
        """Run `kinds` in order, at most `concurrency` at once besides the stalled clients,
        starting none after `until` (time.monotonic()). Stalled clients hold no slot (else
        enough of them would take every slot and nothing would finish); they are let go in
        waves of `concurrency // 4` as more arrive, and the last wave once the rest are done
        (`release` False: the caller releases `self.hold`)."""
        sem = asyncio.Semaphore(concurrency)
        wave = max(1, concurrency // 4)
        stalled: list[asyncio.Task] = []
        results: list[sc.Outcome] = []

        hung = self.args.request_timeout + 60  # every client bounds its own wait before

        async def one(kind: str, coro) -> None:
            try:
                if kind.endswith("_stalled"):
                    results.append(await coro)
                else:
                    results.append(await asyncio.wait_for(coro, hung))
            except TimeoutError:  # a harness bug: say so, do not hang the soak
                results.append(sc.Outcome(kind, kind.split("_")[0], "CLIENT_HUNG",
                                          detail=f"no outcome after {hung:.0f} s"))
            except Exception as e:  # a harness bug or a refused connection: an outcome too
                results.append(sc.Outcome(kind, kind.split("_")[0], "CLIENT_ERROR",
                                          detail=f"{type(e).__name__}: {e}"))
            finally:
                if not kind.endswith("_stalled"):
                    sem.release()

        tasks = []
        parked = 0
        for kind in kinds:
            if until is not None and time.monotonic() > until:
                break
            if kind.endswith("_stalled"):
                if parked == wave:  # let the parked ones go; the next ones wait on a new event
                    self.hold.set()
                    self.hold, parked = asyncio.Event(), 0
                parked += 1
                stalled.append(asyncio.create_task(one(kind, self.run_kind(kind))))
                continue
            await sem.acquire()
            tasks.append(asyncio.create_task(one(kind, self.run_kind(kind))))
        await asyncio.gather(*tasks)
        if release:
            self.hold.set()
            await asyncio.gather(*stalled)
            self.hold = asyncio.Event()
        return results


# -- checks ----------------------------------------------------------------------------------

def classify(outcomes: Sequence[sc.Outcome], reference, max_tokens: int) -> dict[str, list]:
    """Sort outcomes into wrong, lost, twice and unexpected (each a list of descriptions)."""
    bad: dict[str, list] = {"wrong": [], "lost": [], "twice": [], "unexpected": []}
    for o in outcomes:
        if o.code not in EXPECTED[o.kind]:
            bad["unexpected"].append(f"{o.kind}: {o.code} {o.detail[:120]}")
            continue
        if o.after_finish or o.finishes > 1:
            bad["twice"].append(f"{o.kind}: {o.finishes} finishes, {o.after_finish} after")
        if o.kind not in CHECKED or o.prompt < 0:
            continue
        ids, text = reference[o.prompt]
        if o.code == "OK":
            if o.finishes != 1 or o.finish_reason.lower() not in ("length",
                                                                 "finish_reason_length"):
                bad["lost"].append(f"{o.kind}: finished {o.finishes}x ({o.finish_reason})")
            elif o.front == "grpc" and o.token_ids != ids:
                bad["wrong"].append(f"{o.kind}: prompt {o.prompt}: {o.token_ids} != {ids}")
            elif o.front == "http" and (o.text != text or len(o.token_ids) != max_tokens):
                bad["wrong"].append(f"{o.kind}: prompt {o.prompt}: {o.text!r} != {text!r}")
        elif (o.front == "grpc" and o.token_ids != ids[:len(o.token_ids)]) or (
                o.front == "http" and not text.startswith(o.text)):
            bad["wrong"].append(f"{o.kind} ({o.code}): not a prefix of prompt {o.prompt}'s")
    return bad


def rss_bytes(pids: Sequence[int]) -> int | None:
    """Summed VmRSS of `pids` (None when one cannot be read: another host, or gone)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if m is None:
            return None
        total += int(m.group(1)) * 1024
    return total


def scrape(base_url: str) -> dict[str, float]:
    """The unlabelled (or model_name-labelled) samples of the server's /metrics, and under
    "NAME:sum" each family's sum over all its labels."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, value in re.findall(r"^(jaxinfer_\w+)(?:\{model_name=\"[^\"]*\"\})? (\S+)$", text,
                                  re.MULTILINE):
        out[name] = float(value)
    for name, value in re.findall(r"^(jaxinfer_\w+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE):
        out[name + ":sum"] = out.get(name + ":sum", 0.0) + float(value)
    return out


FINISHED = "jaxinfer_request_finished_total:sum"


async def wait_idle(base_url: str, timeout: float, finished: float = 0.0) -> dict[str, float]:
    """The metrics once nothing runs, waits or holds a page and at least `finished` requests
    have finished in all (or the last ones seen after `timeout` seconds)."""
    end = time.monotonic() + timeout
    while True:
        m = await asyncio.to_thread(scrape, base_url)
        idle = (m.get("jaxinfer_num_requests_running") == 0
                and m.get("jaxinfer_num_requests_waiting") == 0
                and m.get("jaxinfer_kv_pages_used") == 0
                and m.get(FINISHED, 0.0) >= finished)
        if idle or time.monotonic() > end:
            return m
        await asyncio.sleep(0.2)


# -- phases ----------------------------------------------------------------------------------

async def burst(soak: Soak, n: int, slo: float) -> dict:
    """`n` plain requests at once (a burst past the queue) while a process of its own checks
    health every 50 ms (timed there, so the harness's own backlog of `n` calls does not count):
    the refusals must be immediate and health must keep answering. The refusal times are
    the clients' and include that backlog."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
    stop, queue = ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=sc.health_probe, args=(soak.args.target, soak.http, stop, queue),
                        daemon=True)
    probe.start()

    def collect(until_exit: bool) -> list:
        """The probe's results: the first one (it is up), or all until it has exited."""
        got, end = [], time.monotonic() + 60
        while time.monotonic() < end:
            try:
                got.append(queue.get(timeout=0.2))
            except Empty:
                if not probe.is_alive():
                    break
                continue
            if not until_exit:
                break
        return got

    checks = await asyncio.to_thread(collect, False)  # the probe is up before the burst starts
    kinds = ["grpc_unary" if soak.http is None or k % 3 else "http_stream" for k in range(n)]
    try:
        outcomes = await soak.run_many(kinds, concurrency=n)
    finally:
        stop.set()
        checks += await asyncio.to_thread(collect, True)
        if probe.is_alive():
            probe.kill()
    latencies = [max(took.values()) for took, _ in checks]
    per_front = {f: max(took[f] for took, _ in checks) for f in (checks[0][0] if checks else ())}
    statuses = collections.Counter(what for _, what in checks)
    refused = [o for o in outcomes if o.code in ("RESOURCE_EXHAUSTED", "HTTP 429")]
    took = sorted(o.seconds for o in refused) or [0.0]
    return {"outcomes": outcomes, "refused": len(refused),
            "refusal_s_max": took[-1], "refusal_s_p50": took[len(took) // 2],
            "refusal_s_p99": took[min(len(took) - 1, int(len(took) * 0.99))],
            "health_s_max": max(latencies, default=float("inf")), "health_s_by_front": per_front,
            "health_checks": len(latencies), "health_statuses": dict(statuses),
            "health_ok": bool(latencies) and max(latencies) <= slo and all(
                w.startswith("SERVING") for w in statuses)}


async def stalled(soak: Soak, n: int, requests: int, concurrency: int, tokens: int,
                  idle_timeout: float) -> dict:
    """Well-behaved clients' TTFT without and then with `n` clients that stopped reading:
    `requests` plain streams at `concurrency` (the baseline); then `n` stalled streams of
    `tokens` tokens each (half gRPC, half HTTP) are started and, once the server has generated
    their tokens (all `n` finished in the engine, nothing runs or waits), the same plain load
    runs again beside them. The
    stalled clients cost the server only their buffers and blocked writes by then, which must
    not slow anyone else down."""
    kinds = ["grpc_stream" if soak.http is None or k % 2 else "http_stream"
             for k in range(requests)]
    base = await soak.run_many(kinds, concurrency=concurrency, release=False)
    before = (await asyncio.to_thread(scrape, soak.args.http_url)).get(FINISHED, 0.0)
    held = []
    for k in range(n):  # index -1: longer than the reference, so their tokens go unchecked
        p = soak.prompts[soak.rng.randrange(len(soak.prompts))]
        if soak.http is not None and k % 2:
            coro = sc.http_stalled(*soak.http, soak.model_name, "http_stalled", -1, p, tokens,
                                   hold=soak.hold)
        else:
            coro = sc.grpc_stream(soak.stub(), "grpc_stalled", -1, p, tokens,
                                  timeout=soak.args.request_timeout, hold=soak.hold)
        held.append(asyncio.create_task(coro))
    idle = await wait_idle(soak.args.http_url, idle_timeout, finished=before + n)
    generated = idle.get(FINISHED, 0.0) >= before + n
    beside = await soak.run_many(kinds, concurrency=concurrency, release=False)
    soak.hold.set()
    held_out = await asyncio.gather(*held)
    soak.hold = asyncio.Event()

    def p99(outs):
        t = sorted(o.ttft for o in outs if o.code == "OK" and o.ttft is not None)
        return t[min(len(t) - 1, int(len(t) * 0.99))] if t else None

    return {"outcomes": base + beside + list(held_out), "ttft_p99_alone": p99(base),
            "ttft_p99_beside": p99(beside), "generated": generated}


async def drain(soak: Soak, proc: subprocess.Popen | None, pid: int, streams: int) -> dict:
    """SIGTERM while `streams` long-ish streams run; afterwards new requests must be refused
    and the server must exit 0."""
    a = soak.args
    long_tokens = a.drain_tokens
    running = []
    for k in range(streams):
        i = k % len(soak.prompts)
        if soak.http is not None and k % 4 == 3:
            running.append(asyncio.create_task(sc.http_stream(
                *soak.http, soak.model_name, "drain_http", i, soak.prompts[i],
                long_tokens, timeout=a.request_timeout)))
        else:
            running.append(asyncio.create_task(sc.grpc_stream(
                soak.stub(), "drain_grpc", i, soak.prompts[i], long_tokens,
                timeout=a.request_timeout)))
    await asyncio.sleep(a.drain_delay)
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.5)
    late = await sc.grpc_unary(soak.stubs[0], "late", 0, soak.prompts[0], 2, timeout=10)
    late_http = None
    if soak.http is not None:
        late_http = await sc.http_unary(*soak.http, "late", sc.completion_body(
            soak.model_name, soak.prompts[0], 2, stream=False), timeout=10)
    outcomes = await asyncio.gather(*running)
    exit_code = None
    if proc is not None:
        exit_code = await asyncio.to_thread(proc.wait, a.drain_timeout + 60)
    bad = []
    for o in outcomes:
        if o.code == "OK":  # all its tokens, the reference's first (greedy: a prefix)
            ids, text = soak.reference[o.prompt]
            n = min(len(ids), long_tokens)
            if o.finishes != 1 or o.after_finish or len(o.token_ids) != long_tokens:
                bad.append(f"{o.kind}: {o.finishes} finishes, {len(o.token_ids)} tokens")
            elif (o.front == "grpc" and o.token_ids[:n] != ids[:n]) or (
                    o.front == "http" and not (o.text.startswith(text) or
                                               text.startswith(o.text))):
                bad.append(f"{o.kind}: prompt {o.prompt}: not the reference's tokens")
        elif o.code not in ("UNAVAILABLE", "HTTP 503"):
            bad.append(f"{o.kind}: {o.code} {o.detail[:100]}")
    refused_ok = late.code == "UNAVAILABLE" and (
        late_http is None or late_http.code in ("HTTP 503", "REFUSED", "CONNECTION_LOST"))
    return {"finished": sum(o.code == "OK" for o in outcomes),
            "unavailable": sum(o.code in ("UNAVAILABLE", "HTTP 503") for o in outcomes),
            "bad": bad, "late": late.code, "late_http": late_http.code if late_http else None,
            "refused_ok": refused_ok, "exit_code": exit_code}


# -- the server, when the harness starts it ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(serve_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str, str]:
    """`python -m serve` with `serve_args` on free ports (unless given); (process, gRPC
    target, HTTP base URL)."""
    args = list(serve_args)
    if "--port" not in args:
        args += ["--port", str(_free_port())]
    if "--http-port" not in args:
        args += ["--http-port", str(_free_port())]
    port = args[args.index("--port") + 1]
    http_port = args[args.index("--http-port") + 1]
    if http_port == "0":
        raise UsageError("the harness needs the HTTP front (its /metrics): drop --http-port 0")
    log = open(log_path, "w")  # noqa: SIM115 (the child writes it until it exits)
    proc = subprocess.Popen([sys.executable, "-m", "serve", *args], stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"


# -- report ----------------------------------------------------------------------------------

def emit(rows: list[dict], base: dict, metric: str, value, unit: str, **extra) -> None:
    row = dict(base, metric=metric, value=value, unit=unit, **extra)
    rows.append(row)
    print(json.dumps(row), flush=True)


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stderr
    table = [["phase", "metric", "value", "unit", "check"]]
    for r in rows:
        check = "" if "ok" not in r else ("ok" if r["ok"] else "FAILED")
        value = r["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.append([r.get("phase", ""), r["metric"], shown, r["unit"], check])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=file)


async def run(args: argparse.Namespace, serve_args: list[str]) -> tuple[list[dict], list[str]]:
    """Every phase; (rows, failed checks)."""
    from jaxinfer.run_info import git_sha

    proc = None
    log_path = None
    if serve_args:
        log_path = Path(args.server_log or tempfile.mkstemp(prefix="soak-serve-",
                                                            suffix=".log")[1])
        proc, args.target, args.http_url = spawn_server(serve_args, log_path)
        print(f"{PROG}: started python -m serve (pid {proc.pid}), log {log_path}",
              file=sys.stderr)
    channels = []
    try:
        channel, stub, summary = await connect(args.target, args.connect_timeout, None)
        channels = [channel] + [grpc.aio.insecure_channel(args.target)
                                for _ in range(args.channels - 1)]
        info = await stub.ServerInfo(pb.ServerInfoRequest(), timeout=10)
        engine = json.loads(info.engine_json or "{}")
        model_name = args.model or _served_model(args.http_url) or summary.model
        pid = proc.pid if proc is not None else (args.server_pid or engine.get("front_pid"))
        pids = sorted({p for p in [pid, *engine.get("engine_pids", [])] if p})
        http = None
        if args.http_url:
            m = re.match(r"https?://([^:/]+):(\d+)", args.http_url)
            if m is None:
                raise UsageError(f"--http-url {args.http_url!r} is not http://HOST:PORT")
            http = (m.group(1), int(m.group(2)))
        limits = info.limits
        check_tokens(args, limits)
        soak = Soak(args, summary, limits, channels, http, model_name)
        mix = parse_mix(args.mix)
        if http is None:
            mix = {k: v for k, v in mix.items() if not k.startswith("http_")}
        rows: list[dict] = []
        failed: list[str] = []
        base = dict(name="soak", model=summary.model, dtype=summary.dtype, quant=summary.quant,
                    mesh=summary.mesh, device=summary.device, git_sha=git_sha(),
                    requests=args.requests, concurrency=args.concurrency,
                    max_tokens=args.max_tokens, max_queue=int(limits.max_queue))

        def check(phase: str, name: str, ok: bool, value, unit: str, why: str,
                  **extra) -> None:
            emit(rows, base, name, value, unit, phase=phase, check=name, ok=bool(ok), **extra)
            if not ok:
                failed.append(f"{phase}: {name}: {why}")

        def check_outcomes(phase: str, bad: dict[str, list]) -> None:
            """The wrong/lost/twice/unexpected checks, with the first few cases of each."""
            for key in ("wrong", "lost", "twice", "unexpected"):
                found = bad[key]
                check(phase, key, not found, len(found), "requests",
                      f"{len(found)}, e.g. {found[0]}" if found else "",
                      **({"examples": found[:3]} if found else {}))

        t0 = time.monotonic()
        await soak.build_reference()
        emit(rows, base, "reference_s", round(time.monotonic() - t0, 3), "s", phase="reference")
        warm = await soak.run_many(["grpc_stream", "http_stream"] * (args.warmup // 2),
                                   concurrency=args.concurrency)
        warm_bad = classify(warm, soak.reference, args.max_tokens)
        await wait_idle(args.http_url, 30)
        rss0 = rss_bytes(pids)

        kinds = soak.rng.choices(list(mix), weights=list(mix.values()), k=args.requests)
        t1 = time.monotonic()
        outcomes = await soak.run_many(kinds, concurrency=args.concurrency,
                                       until=t1 + args.duration)
        soak_s = time.monotonic() - t1
        bad = classify(outcomes, soak.reference, args.max_tokens)
        for key in bad:
            bad[key] += warm_bad[key]
        counts = collections.Counter((o.kind, o.code) for o in outcomes)
        emit(rows, base, "requests_done", len(outcomes), "requests", phase="soak")
        emit(rows, base, "soak_s", round(soak_s, 3), "s", phase="soak")
        for (kind, code), n in sorted(counts.items()):
            emit(rows, base, f"{kind}:{code}", n, "requests", phase="soak", kind=kind,
                 code=code)
        plain = [o.ttft for o in outcomes if o.kind in ("grpc_stream", "http_stream")
                 and o.code == "OK" and o.ttft is not None]
        if plain:
            plain.sort()
            emit(rows, base, "ttft_p50_ms", round(1e3 * plain[len(plain) // 2], 2), "ms",
                 phase="soak")
            emit(rows, base, "ttft_p99_ms", round(1e3 * plain[int(len(plain) * 0.99)], 2),
                 "ms", phase="soak")
        tokens = sum(len(o.token_ids) for o in outcomes)
        emit(rows, base, "output_tok_s", round(tokens / max(soak_s, 1e-9), 1), "tok/s",
             phase="soak")
        check_outcomes("soak", bad)

        if args.stalled:
            # their generation must end first: up to a request's own deadline
            wait = max(args.idle_timeout, args.request_timeout)
            st = await stalled(soak, args.stalled, args.stalled_requests,
                               args.stalled_concurrency, args.stalled_tokens, wait)
            st_bad = classify(st["outcomes"], soak.reference, args.max_tokens)
            for (kind, code), k in sorted(collections.Counter(
                    (o.kind, o.code) for o in st["outcomes"]).items()):
                emit(rows, base, f"{kind}:{code}", k, "requests", phase="stalled", kind=kind,
                     code=code)
            check("stalled", "stalled_requests_generated", st["generated"], st["generated"],
                  "bool", f"the stalled clients' requests did not finish within "
                  f"{wait:.0f} s, so the second run overlapped them")
            alone, beside = st["ttft_p99_alone"], st["ttft_p99_beside"]
            emit(rows, base, "ttft_p99_alone_ms", alone and round(1e3 * alone, 2), "ms",
                 phase="stalled")
            emit(rows, base, "ttft_p99_beside_stalled_ms", beside and round(1e3 * beside, 2),
                 "ms", phase="stalled", stalled_clients=args.stalled)
            ratio = beside / alone if alone and beside else None
            check("stalled", "ttft_p99_ratio", ratio is not None
                  and ratio <= args.stalled_ttft_ratio, ratio and round(ratio, 3), "ratio",
                  f"TTFT p99 beside {args.stalled} stalled clients is {ratio and round(ratio, 2)}x"
                  f" the run without them (allowed {args.stalled_ttft_ratio}x)")
            check_outcomes("stalled", st_bad)

        if args.burst:
            n = max(1, int(args.burst * int(limits.max_queue)))
            b = await burst(soak, n, args.health_slo)
            b_bad = classify(b["outcomes"], soak.reference, args.max_tokens)
            emit(rows, base, "burst_requests", n, "requests", phase="burst")
            for (kind, code), k in sorted(collections.Counter(
                    (o.kind, o.code) for o in b["outcomes"]).items()):
                emit(rows, base, f"{kind}:{code}", k, "requests", phase="burst", kind=kind,
                     code=code)
            emit(rows, base, "burst_refused", b["refused"], "requests", phase="burst")
            for q in ("p50", "p99", "max"):
                emit(rows, base, f"burst_refusal_s_{q}", round(b[f"refusal_s_{q}"], 3), "s",
                     phase="burst")
            emit(rows, base, "health_checks", b["health_checks"], "checks", phase="burst")
            for front, took in sorted(b["health_s_by_front"].items()):
                emit(rows, base, f"health_{front}_s_max", round(took, 3), "s", phase="burst")
            check("burst", "health_s_max", b["health_ok"], round(b["health_s_max"], 3), "s",
                  f"health took up to {b['health_s_max']:.2f} s ({b['health_statuses']})")
            check_outcomes("burst", b_bad)

        m = await wait_idle(args.http_url, args.idle_timeout)
        for name in ("jaxinfer_num_requests_running", "jaxinfer_num_requests_waiting",
                     "jaxinfer_kv_pages_used"):
            value = m.get(name)
            check("idle", name, value == 0, value, "count",
                  f"{name} is {value} after the soak (want 0)")
        emit(rows, base, "kv_pages_free", m.get("jaxinfer_kv_pages_free"), "pages",
             phase="idle")
        rss1 = rss_bytes(pids)
        if rss0 is not None and rss1 is not None:
            emit(rows, base, "rss_warm_mib", round(rss0 / 2**20, 1), "MiB", phase="idle")
            growth = rss1 / rss0 - 1
            check("idle", "rss_growth", growth <= args.max_rss_growth, round(growth, 4),
                  "fraction", f"RSS grew {100 * growth:.1f}% ({rss0 / 2**20:.0f} -> "
                  f"{rss1 / 2**20:.0f} MiB; allowed {100 * args.max_rss_growth:.0f}%)")
        else:
            emit(rows, base, "rss_growth", None, "fraction", phase="idle",
                 note="server processes not readable here (another host?)")

        if args.sigterm:
            if not pid:
                raise UsageError("--sigterm needs the server's pid (start it with `-- ...` "
                                 "or give --server-pid)")
            d = await drain(soak, proc, int(pid), args.drain_streams)
            emit(rows, base, "drain_finished", d["finished"], "requests", phase="drain")
            emit(rows, base, "drain_unavailable", d["unavailable"], "requests", phase="drain")
            check("drain", "drain_in_flight", not d["bad"], len(d["bad"]), "requests",
                  f"{len(d['bad'])} streams ended otherwise, e.g. {d['bad'][:1]}")
            check("drain", "drain_refuses_new", d["refused_ok"], d["late"], "code",
                  f"a request after SIGTERM got {d['late']} / {d['late_http']}")
            if proc is not None:
                check("drain", "exit_code", d["exit_code"] == 0, d["exit_code"], "code",
                      f"the server exited {d['exit_code']}")
        return rows, failed
    finally:
        for c in channels:
            await c.close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _served_model(http_url: str | None) -> str | None:
    if not http_url:
        return None
    try:
        with urllib.request.urlopen(http_url + "/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except (OSError, urllib.error.URLError, KeyError, IndexError, ValueError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- start `python -m serve` with them.")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC address of the server")
    p.add_argument("--http-url", default="http://127.0.0.1:8000",
                   help="its HTTP front (for HTTP clients and /metrics)")
    p.add_argument("--model", default=None, help="HTTP model name (default: /v1/models' first)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="the front's pid (default: from ServerInfo) for RSS and --sigterm")
    p.add_argument("--requests", type=int, default=1000, help="requests in the soak phase")
    p.add_argument("--concurrency", type=int, default=1000, help="at most this many at once")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds after which no new request starts (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per request (greedy)")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts (references)")
    p.add_argument("--warmup", type=int, default=64, help="plain requests before the RSS "
                   "baseline")
    p.add_argument("--mix", default=DEFAULT_MIX, help="KIND=SHARE,... (default %(default)s)")
    p.add_argument("--slow-interval", type=float, default=1.0,
                   help="seconds between a slow reader's reads")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="client deadline of a request: one past it is lost")
    p.add_argument("--stalled", type=int, default=100,
                   help="clients that stop reading in the stalled phase (0: no such phase)")
    p.add_argument("--stalled-tokens", type=int, default=96,
                   help="tokens each stalled client asks for (enough to fill its buffers)")
    p.add_argument("--stalled-requests", type=int, default=100,
                   help="well-behaved streams timed without and beside the stalled clients")
    p.add_argument("--stalled-concurrency", type=int, default=8,
                   help="how many of those run at once")
    p.add_argument("--stalled-ttft-ratio", type=float, default=2.0,
                   help="allowed TTFT p99 beside the stalled clients over without them")
    p.add_argument("--burst", type=float, default=10.0,
                   help="burst size as a multiple of the server's max_queue (0: none)")
    p.add_argument("--health-slo", type=float, default=1.0,
                   help="seconds a health check may take during the burst")
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="allowed RSS growth over the warm baseline (fraction)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds the metrics may take to show an idle server")
    p.add_argument("--sigterm", action="store_true", help="end with a drain under load")
    p.add_argument("--drain-streams", type=int, default=200)
    p.add_argument("--drain-tokens", type=int, default=64, help="tokens of each drain stream")
    p.add_argument("--drain-delay", type=float, default=1.0,
                   help="seconds between starting the drain streams and SIGTERM")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="the server's --drain-timeout (how long to wait for its exit)")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels to spread calls on")
    p.add_argument("--connect-timeout", type=float, default=600.0)
    p.add_argument("--server-log", default=None, help="where a started server logs")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("requests", "concurrency", "max_tokens", "prompts", "channels",
                 "stalled_tokens", "stalled_requests", "stalled_concurrency"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.stalled < 0:
        raise UsageError("--stalled must be >= 0")
    if args.duration <= 0 or args.request_timeout <= 0:
        raise UsageError("--duration and --request-timeout must be > 0")
    parse_mix(args.mix)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        check_args(args)
        rows, failed = asyncio.run(run(args, serve_args))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ServerError, OSError, grpc.RpcError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    if failed:
        for why in failed:
            print(f"{PROG}: FAILED: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
