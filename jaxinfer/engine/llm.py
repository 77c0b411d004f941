"""Offline generation: the engine core(s) driven synchronously, as vLLM's `LLM` drives the same
engine core as its server.

`LLM.generate` queues every request, then steps each core until all have finished, passing
every step's outputs through the one `OutputProcessor` (text, stop strings, logprobs). So
offline generation runs exactly the scheduler, programs and sampling the server runs: the same
request with the same seed gives the same tokens here and served.

Data parallelism: one core per dp replica (`sharding.mesh.replica_meshes`), each with its own
copy of the weights, KV pages and slots; requests go to the replicas round-robin in order, and
the cores are stepped in turn from this thread (each step only dispatches and reads, so every
replica's device stays busy while the others are stepped). In a multi-host run every process
steps the cores whose devices it holds, with the same requests in the same order, so the
processes launch the same programs (JAX's multi-controller rule); results are gathered to every
process at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.core import EngineCore
from jaxinfer.engine.output import OutputProcessor
from jaxinfer.engine.request import (FinishReason, Limits, Request, TokenLogprob,
                                     validate_request)
from jaxinfer.model_loader import LoadedModel, load_model, load_model_config
from jaxinfer.tokenizer import Tokenizer
from sharding.mesh import MeshSpec, check_model_fits, make_mesh, replica_meshes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    """One sample of one request, finished."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason  # "stop" (EOS, stop id or string) or "length"; else a failure
    index: int = 0  # sample index in [0, n)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    error: str | None = None
    # Speculative decoding of this sample (when it ran): num_drafts, num_draft_tokens,
    # num_accepted_tokens, vLLM's counters.
    speculative: dict | None = None

    def to_json(self) -> dict:
        """`generate --json`'s object: prompt_ids, token_ids, text, finish_reason (and index
        for n > 1, logprobs when asked for)."""
        out = {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
               "finish_reason": self.finish_reason}
        if self.index:
            out["index"] = self.index
        if self.logprobs is not None:
            out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                                "top": [[t, v] for t, v in lp.top]} for lp in self.logprobs]
        if self.error:
            out["error"] = self.error
        if self.speculative is not None:
            out["speculative"] = self.speculative
        return out


class LLM:
    """Offline engine over one core per dp replica.

    Args:
        cores: the engine cores (one per replica), all of the same model and config.
        tokenizer: for text and stop strings (None: token ids only).
    """

    def __init__(self, cores: Sequence[EngineCore], tokenizer: Tokenizer | None, *,
                 quant: str = "none") -> None:
        if not cores:
            raise ValueError("LLM needs at least one engine core")
        self.cores = list(cores)
        self.tokenizer = tokenizer
        self.quant = quant  # weight quantization of the loaded model (jaxinfer.quant)
        self._ids = 0
        # A core whose devices this process does not hold is not stepped here (multi-host).
        self._local = [any(d.process_index == jax.process_index()
                           for d in c.runner.mesh.devices.flat) for c in self.cores]

    @classmethod
    def load(cls, model: str, engine_cfg: EngineConfig, *, mesh: jax.sharding.Mesh | str,
             dtype: str, seed: int = 0, quant: str | None = None,
             allow_pickle: bool = False) -> LLM:
        """Load `model` (a preset or a directory) once per dp replica of `mesh`."""
        if isinstance(mesh, str):
            mesh = make_mesh(mesh)
        # One line naming the whole mesh (each replica's own check would name dp=1).
        check_model_fits(MeshSpec.of(mesh), load_model_config(model))
        cores, loaded = [], None
        for sub in replica_meshes(mesh):
            loaded = load_model(model, mesh=sub, dtype=dtype, seed=seed,
                                allow_pickle=allow_pickle, quant=quant)
            cores.append(EngineCore.create(loaded, engine_cfg, mesh=sub))
        return cls(cores, loaded.tokenizer, quant=loaded.quant)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, engine_cfg: EngineConfig, *,
                    mesh: jax.sharding.Mesh) -> LLM:
        """One core over an already loaded model (its mesh must have dp = 1)."""
        if MeshSpec.of(mesh).dp != 1:
            raise ValueError("from_loaded takes a dp = 1 mesh; use LLM.load for replicas")
        return cls([EngineCore.create(loaded, engine_cfg, mesh=mesh)], loaded.tokenizer,
                   quant=loaded.quant)

    # -- properties -------------------------------------------------------------------------
    @property
    def core(self) -> EngineCore:
        """The first replica's core (the only one with dp = 1)."""
        return self.cores[0]

    @property
    def limits(self) -> Limits:
        return self.cores[0].limits()

    @property
    def num_compiles(self) -> int:
        return sum(c.runner.num_compiles for c in self.cores)

    @property
    def compile_seconds(self) -> float:
        return sum(c.runner.compile_seconds for c in self.cores)

    def pages_used(self) -> int:
        return sum(c.scheduler.kv.num_used for c in self.cores)

    # -- generation -------------------------------------------------------------------------
    def request(self, prompt_ids: Sequence[int], *, max_tokens: int, **kw) -> Request:
        """A Request with a fresh id (keyword arguments as `Request`'s)."""
        self._ids += 1
        return Request(request_id=f"offline-{self._ids}", prompt_ids=[int(t) for t in prompt_ids],
                       max_tokens=max_tokens, **kw)

    def generate(self, requests: Sequence[Request], *,
                 on_step: Callable[[int, list], None] | None = None) -> list[list[Completion]]:
        """Run every request to completion; returns each request's n Completions.

        A request without a seed uses its index in `requests` (offline runs are
        reproducible); sample i of n uses seed + i, as served.
        `on_step(step, outputs)` sees every step's Outputs (the bench times with it)."""
        if not requests:
            raise ValueError("no requests given")
        for core, here in zip(self.cores, self._local):
            if core.spec is not None and core.spec_by_sample is None:
                core.spec_by_sample = {}  # count speculation per sample (Completion.speculative)
            plan = core.scheduler.spec
            if here and plan is not None and plan.adaptive and not plan.costs:
                # Adaptive depth weighs tiers by their timed cost: without the warm-up (which
                # compiles every program and times each tier) it would never speculate.
                core.warmup()
        limits = self.limits
        for req in requests:
            validate_request(req, limits)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        proc = OutputProcessor(self.tokenizer)
        results: dict[str, list[Completion | None]] = {r.request_id: [None] * r.n
                                                       for r in requests}
        acc_of: dict[tuple[str, int], list] = {}
        where: dict[str, EngineCore] = {}
        for i, req in enumerate(requests):
            core = self.cores[i % len(self.cores)]
            where[req.request_id] = core
            proc.add(req)
            if self._local[i % len(self.cores)]:
                core.add_request(req, seed=req.sampling.seed if req.sampling.seed is not None
                                 else i)
        step = 0
        local = [c for c, here in zip(self.cores, self._local) if here]
        while any(c.has_unfinished() for c in local):
            outs = []
            for core in local:
                if core.has_unfinished():
                    o, _ = core.step()
                    outs.extend(o)
            done = proc.process(outs)
            for rid, index in done.stopped:
                where[rid].abort(rid, "stop", index=index, report=False)
            for state, out in done.outputs:
                acc = acc_of.setdefault((out.request_id, out.index), [[], [], []])
                acc[0].extend(out.token_ids)
                acc[1].append(out.text)
                acc[2].extend(out.logprobs)
                if out.finish_reason is not None:
                    req = state.request
                    spec = where[out.request_id].pop_spec_stats(out.request_id, out.index)
                    results[out.request_id][out.index] = Completion(
                        prompt_ids=list(req.prompt_ids), token_ids=list(acc[0]),
                        text="".join(acc[1]), finish_reason=out.finish_reason,
                        index=out.index, logprobs=list(acc[2]) if req.logprobs else None,
                        error=out.error, speculative=spec)
            if on_step is not None:
                on_step(step, [o for _, o in done.outputs])
            step += 1
        if jax.process_count() > 1 and not all(self._local):
            results = _gather(results, requests)
        return [[c for c in results[r.request_id]] for r in requests]

    def prompt_logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [len(prompt_ids), V] of every position of a prompt, through the
        first core's `verify` program (the tests' scoring; it leaves no pages behind)."""
        core = self.cores[0]
        eng, kv = core.engine_cfg, core.scheduler.kv
        n = len(prompt_ids)
        chunk = max(eng.prefill_buckets[-1], 1)
        width = core.runner.full_width
        seq_id = -1 - self._ids
        self._ids += 1
        if kv.allocate(seq_id, n) is None:
            raise RuntimeError(f"no KV pages free for a {n}-token prompt")
        try:
            pages = kv.pages(seq_id)
            out = []
            for start in range(0, n, chunk):
                part = list(prompt_ids[start: start + chunk])
                row = np.zeros((1, chunk + width + 2), np.int32)
                row[0, : len(part)] = part
                row[0, chunk: chunk + len(pages)] = pages
                row[0, chunk + width:] = (start, len(part))
                logits = core.runner.verify(row, chunk=chunk, width=width)
                out.append(np.asarray(logits)[0, : len(part)])
            return np.concatenate(out)
        finally:
            kv.free(seq_id)


def _gather(results: dict, requests: Sequence[Request]) -> dict:
    """Every process's completions to every process (a multi-host run where some replicas'
    devices are on other processes), as JSON bytes (`Completion.to_json`)."""
    import json

    from jax.experimental import multihost_utils

    mine = {rid: [c.to_json() if c is not None else None for c in comps]
            for rid, comps in results.items()}
    blob = np.frombuffer(json.dumps(mine).encode(), np.uint8)
    size = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
    padded = np.zeros(int(size.max()), np.uint8)
    padded[: blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    merged: dict = {r.request_id: [None] * r.n for r in requests}
    for p in range(every.shape[0]):
        part = json.loads(bytes(every[p][: int(size[p][0])]).decode())
        for rid, comps in part.items():
            for i, c in enumerate(comps):
                if c is not None and merged[rid][i] is None:
                    lps = c.get("logprobs")
                    merged[rid][i] = Completion(
                        prompt_ids=c["prompt_ids"], token_ids=c["token_ids"], text=c["text"],
                        finish_reason=c["finish_reason"], index=c.get("index", 0),
                        error=c.get("error"),
                        logprobs=None if lps is None else [
                            TokenLogprob(token_id=x["token_id"], logprob=x["logprob"],
                                         top=tuple((t, v) for t, v in x["top"])) for x in lps])
    return merged
