"""Prometheus metrics of a running server, served over HTTP on `--metrics-port`.

`PrometheusMetrics` is the sink `serve/engine_client.py` reports to from its output thread (the
cores' step stats, and TTFT/ITL/e2e as the front sees them; prometheus_client's metric types are
thread-safe and cheap), and the gRPC layer adds
request counts by method and status code. Every metric lives in the object's own
`CollectorRegistry`, never the process-wide default one, so two servers (or a test and a server)
in one process never share or clash on a metric.

Names follow Prometheus conventions (`_seconds`, `_total`) under the `jaxinfer_` prefix:

    jaxinfer_time_to_first_token_seconds     histogram  arrival -> first token of a request
    jaxinfer_inter_token_latency_seconds     histogram  between consecutive tokens of a sample
    jaxinfer_e2e_request_latency_seconds     histogram  arrival -> last token of a request
    jaxinfer_step_host_seconds               histogram  host time per engine step (all of it)
    jaxinfer_step_schedule_seconds           histogram  its scheduler share (schedule + update)
    jaxinfer_step_tokens_total               counter    tokens processed by engine steps
    jaxinfer_num_requests_waiting            gauge      queue length
    jaxinfer_num_requests_running            gauge      sequences in the running batch
    jaxinfer_batch_occupancy                 gauge      used / compiled batch slots, in [0, 1]
    jaxinfer_kv_pages_used / _free           gauge      KV cache pages
    jaxinfer_prefix_cache_hit_rate           gauge      hit tokens / looked-up prompt tokens
    jaxinfer_prefix_cache_{hit,queried}_tokens_total  counter
    jaxinfer_preemptions_total               counter
    jaxinfer_recompiles_total                counter    compilations after warm-up (a bug)
    jaxinfer_requests_total{method,code}     counter    finished gRPC calls by status code, and
                                                        HTTP requests ("HTTP /v1/...", status)
    jaxinfer_stalled_streams_total{front}    counter    streams cancelled after --stream-timeout
                                                        of a client reading nothing
    jaxinfer_prompt_tokens_total             counter    prompt tokens of requests (at first token)
    jaxinfer_generation_tokens_total         counter    generated tokens, as they stream
    jaxinfer_request_finished_total{finish_reason}  counter  stop, length, cancelled, deadline,
                                                        error, aborted
    jaxinfer_request_queue_time_seconds      histogram  arrival -> first admission to a slot
    jaxinfer_request_prefill_time_seconds    histogram  first admission -> first token
    jaxinfer_request_decode_time_seconds     histogram  first token -> last token

With `model_name` (what `python -m serve` passes: the first --served-model-name), every sample
carries a `model_name` label, as vLLM's metrics do, so one Prometheus can tell models apart.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector
from prometheus_client.exposition import generate_latest

logger = logging.getLogger(__name__)

# Latency buckets from 1 ms to 2 min: TTFT on a loaded server and ITL of a small model both fit.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.6, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0, 120.0)
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
                 0.256, 0.512, 1.0)


class PrometheusMetrics:
    """EngineMetrics backed by prometheus_client, in a private registry."""

    def __init__(self, model_name: str | None = None) -> None:
        # The metrics live in `_own`; `registry` (what is served) shows them, with the
        # model_name label added to every sample when there is one.
        self._own = CollectorRegistry(auto_describe=True)
        if model_name is None:
            self.registry = self._own
        else:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(_Labelled(self._own, {"model_name": model_name}))
        r = self._own
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxinfer_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one sample.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jaxinfer_e2e_request_latency_seconds",
                             "Time from request arrival to its last generated token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_host = Histogram("jaxinfer_step_host_seconds",
                                   "Host time of one engine step: scheduling, dispatch of "
                                   "the device programs, reading back and applying results.",
                                   buckets=_STEP_BUCKETS, registry=r)
        self.step_schedule = Histogram("jaxinfer_step_schedule_seconds",
                                       "Scheduler share of a step's host time: schedule() and "
                                       "update_from_output() with their bookkeeping.",
                                       buckets=_STEP_BUCKETS, registry=r)
        self.step_tokens = Counter("jaxinfer_step_tokens", "Tokens processed by engine steps.",
                                   registry=r)
        self.waiting = Gauge("jaxinfer_num_requests_waiting", "Requests in the queue.",
                             registry=r)
        self.running = Gauge("jaxinfer_num_requests_running",
                             "Sequences in the running batch.", registry=r)
        self.occupancy = Gauge("jaxinfer_batch_occupancy",
                               "Fraction of the compiled batch slots in use.", registry=r)
        self.pages_used = Gauge("jaxinfer_kv_pages_used", "KV cache pages in use.", registry=r)
        self.pages_free = Gauge("jaxinfer_kv_pages_free", "KV cache pages free.", registry=r)
        self.prefix_hit_rate = Gauge("jaxinfer_prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache over prompt tokens "
                                     "looked up, since start.", registry=r)
        self.prefix_hit_tokens = Counter("jaxinfer_prefix_cache_hit_tokens",
                                         "Prompt tokens found in the prefix cache.", registry=r)
        self.prefix_queried_tokens = Counter("jaxinfer_prefix_cache_queried_tokens",
                                             "Prompt tokens looked up in the prefix cache.",
                                             registry=r)
        self.preemptions = Counter("jaxinfer_preemptions", "Sequences preempted (recomputed).",
                                   registry=r)
        self.recompiles = Counter("jaxinfer_recompiles",
                                  "Compilations after warm-up; anything but 0 is a bug.",
                                  registry=r)
        self.requests = Counter("jaxinfer_requests", "Finished gRPC calls and HTTP requests.",
                                ("method", "code"), registry=r)
        self.stalled = Counter("jaxinfer_stalled_streams",
                               "Streams cancelled because their client read nothing for "
                               "--stream-timeout seconds.", ("front",), registry=r)
        # vLLM's speculative-decoding counters.
        self.spec_drafts = Counter("jaxinfer_spec_decode_num_drafts",
                                   "Speculative steps of a sequence that proposed drafts.",
                                   registry=r)
        self.spec_draft_tokens = Counter("jaxinfer_spec_decode_num_draft_tokens",
                                         "Draft tokens proposed.", registry=r)
        self.spec_accepted = Counter("jaxinfer_spec_decode_num_accepted_tokens",
                                     "Draft tokens the verifier kept.", registry=r)
        self.spec_accepted_pos = Counter("jaxinfer_spec_decode_num_accepted_tokens_per_pos",
                                         "Draft tokens kept at each draft position.",
                                         ("position",), registry=r)
        # vLLM's per-request metrics
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens",
                                     "Prompt tokens of requests (counted at the first token).",
                                     registry=r)
        self.generation_tokens = Counter("jaxinfer_generation_tokens",
                                         "Generated tokens (counted as they stream).", registry=r)
        self.finished = Counter("jaxinfer_request_finished", "Finished requests by reason.",
                                ("finish_reason",), registry=r)
        self.queue_time = Histogram("jaxinfer_request_queue_time_seconds",
                                    "Time from arrival to the first admission to a slot.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("jaxinfer_request_prefill_time_seconds",
                                      "Time from the first admission to the first token.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("jaxinfer_request_decode_time_seconds",
                                     "Time from the first token to the last.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._hit = 0
        self._queried = 0

    # -- EngineMetrics -------------------------------------------------------------------

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def add_generation_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def observe_request(self, finish_reason: str, *, queue: float | None,
                        prefill: float | None, decode: float | None) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        for hist, value in ((self.queue_time, queue), (self.prefill_time, prefill),
                            (self.decode_time, decode)):
            if value is not None:
                hist.observe(value)

    def observe_step(self, host_seconds: float, tokens: int,
                     schedule_seconds: float = 0.0) -> None:
        self.step_host.observe(host_seconds)
        self.step_schedule.observe(schedule_seconds)
        self.step_tokens.inc(tokens)

    def set_state(self, *, queued: int, running: int, batch_occupancy: float, pages_used: int,
                  pages_free: int) -> None:
        self.waiting.set(queued)
        self.running.set(running)
        self.occupancy.set(batch_occupancy)
        self.pages_used.set(pages_used)
        self.pages_free.set(pages_free)

    def add_prefix_lookup(self, *, hit_tokens: int, prompt_tokens: int) -> None:
        self.prefix_hit_tokens.inc(hit_tokens)
        self.prefix_queried_tokens.inc(prompt_tokens)
        with self._lock:  # the rate must come from one consistent pair of totals
            self._hit += hit_tokens
            self._queried += prompt_tokens
            self.prefix_hit_rate.set(self._hit / self._queried if self._queried else 0.0)

    def add_preemptions(self, n: int) -> None:
        self.preemptions.inc(n)

    def add_recompiles(self, n: int) -> None:
        self.recompiles.inc(n)

    def add_spec_decode(self, *, drafts: int, draft_tokens: int, accepted: int,
                        accepted_per_pos: list[int]) -> None:
        self.spec_drafts.inc(drafts)
        self.spec_draft_tokens.inc(draft_tokens)
        self.spec_accepted.inc(accepted)
        for i, n in enumerate(accepted_per_pos):
            if n:
                self.spec_accepted_pos.labels(position=str(i)).inc(n)

    # -- gRPC layer ----------------------------------------------------------------------

    def count_request(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def count_stalled_stream(self, front: str) -> None:
        self.stalled.labels(front=front).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format (what the HTTP endpoint serves)."""
        return generate_latest(self.registry)


class _Labelled(Collector):
    """Another registry's metrics with fixed labels added to every sample."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]) -> None:
        self._inner = inner
        self._labels = labels

    def collect(self):
        for metric in self._inner.collect():
            metric.samples = [s._replace(labels={**s.labels, **self._labels})
                              for s in metric.samples]
            yield metric


class MetricsHttpServer:
    """The `/metrics` HTTP endpoint (any path answers) on its own daemon thread."""

    def __init__(self, metrics: PrometheusMetrics, *, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host,
                                                       registry=metrics.registry)
        self.port = self._server.server_port
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
