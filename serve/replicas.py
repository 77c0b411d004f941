"""Data parallelism in the server: `dp` engine replicas behind the one `Engine` interface.

    gRPC handlers ── submit(req) ──▶ ReplicatedEngine ── least loaded ──▶ Engine r (r < dp)
                                                                           own scheduler,
                                                                           pages, slots,
                                                                           device thread,
                                                                           tp devices [r, 0, :]

Each replica is a whole `serve.engine.Engine` on its own `tp` slice of the `(dp, pp, tp)`
device grid: its own copy of the weights, its own KV page pool (`num_pages` each), decode slots
and device/output threads. `submit` sends a request to the replica with the fewest requests in
flight (ties: the lowest index) and the request stays there to the end, as vLLM's data-parallel
engines do; `cancel` goes to every replica (one that does not hold the id ignores it). Metrics:
the replicas share one sink; their state gauges (queue, running, pages) are summed here so
Prometheus sees the whole server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from jaxinfer.errors import RequestError
from serve.engine import Engine
from serve.types import EngineMetrics, FinishReason, Output, Request


class ReplicatedEngine:
    """`dp` engines serving as one; the interface `serve.server.Server` uses."""

    def __init__(self, replicas: Sequence[Engine]) -> None:
        if not replicas:
            raise ValueError("ReplicatedEngine needs at least one replica")
        self.replicas = list(replicas)
        self.tokenizer = self.replicas[0].tokenizer
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------
    def warmup(self, *, progress: bool = True) -> None:
        for i, r in enumerate(self.replicas):  # with --compile-cache later ones hit the cache
            r.warmup(progress=progress and i == 0)

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def drain(self, timeout: float | None = None) -> bool:
        results = [False] * len(self.replicas)

        def one(i: int) -> None:
            results[i] = self.replicas[i].drain(timeout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return all(results)

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()

    # -- requests ------------------------------------------------------------------------
    def submit(self, req: Request, on_output: Callable[[Output], None]) -> None:
        with self._lock:  # the id check and the hand-off are one step
            if any(r.in_flight(req.request_id) for r in self.replicas):
                raise RequestError(f"request_id {req.request_id!r} is already in flight")
            target = min(self.replicas, key=lambda r: r.num_in_flight())
            target.submit(req, on_output)

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        for r in self.replicas:
            r.cancel(request_id, reason)

    # -- introspection -------------------------------------------------------------------
    def info(self) -> dict:
        """Replica 0's info with the whole server's mesh and capacity."""
        infos = [r.info() for r in self.replicas]
        out = dict(infos[0])
        out["mesh"] = {**out["mesh"], "dp": len(infos),
                       "devices": [d for i in infos for d in i["mesh"]["devices"]]}
        out["limits"] = {**out["limits"], **{
            key: sum(i["limits"][key] for i in infos)
            for key in ("max_queue", "max_running", "num_pages")}}
        out["replicas"] = len(infos)
        return out

    def stats(self) -> dict:
        """Sums of the replicas' numeric stats (prefix hit rate: over all lookups)."""
        parts = [r.stats() for r in self.replicas]
        out: dict = {}
        for p in parts:
            for k, v in p.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        out.pop("prefix_hit_rate", None)
        hit = sum(p.get("prefix_hit_tokens", 0) for p in parts)
        total = sum(p.get("prefix_lookup_tokens", 0) for p in parts)
        if "prefix_hit_tokens" in out:
            out["prefix_hit_rate"] = hit / total if total else 0.0
        out["replicas"] = len(parts)
        return out

    @property
    def num_recompiles(self) -> int:
        return sum(r.num_recompiles for r in self.replicas)


class SummedStateMetrics:
    """One replica's view of a shared metrics sink: events pass through, and `set_state` keeps
    this replica's latest values and reports the sum over all replicas."""

    def __init__(self, sink: EngineMetrics, shared: list[dict], index: int,
                 lock: threading.Lock) -> None:
        self._sink, self._shared, self._index, self._lock = sink, shared, index, lock

    @classmethod
    def views(cls, sink: EngineMetrics, n: int) -> list[SummedStateMetrics]:
        shared: list[dict] = [{} for _ in range(n)]
        lock = threading.Lock()
        return [cls(sink, shared, i, lock) for i in range(n)]

    def set_state(self, *, queued: int, running: int, batch_occupancy: float, pages_used: int,
                  pages_free: int) -> None:
        with self._lock:
            self._shared[self._index] = dict(queued=queued, running=running,
                                             batch_occupancy=batch_occupancy,
                                             pages_used=pages_used, pages_free=pages_free)
            parts = [s for s in self._shared if s]
            total = {k: sum(s[k] for s in parts) for k in parts[0]}
            total["batch_occupancy"] /= len(parts)  # a mean of fractions, not a sum
            self._sink.set_state(**total)

    def __getattr__(self, name: str):  # every other metric goes straight to the sink
        return getattr(self._sink, name)
