"""The runner: the engine's device programs for one model on one mesh, compiled ahead of time,
and the device state they carry (the paged KV cache and the slot state).

One runner serves every entry point (offline generation, the bench, the server's engine core):
`prefill`, `decode` (1 or `decode_steps` tokens per dispatch) and `verify` programs from
`jaxinfer/steps.py`, one executable per static shape (`jaxinfer.buckets`), compiled in a thread
pool at warm-up (`compile_all`; XLA releases the GIL) and looked up by key at run time. A shape
missing at run time is compiled on the spot and reported through `on_late_compile` (a recompile
after warm-up is a bug).

A call takes its host inputs as one packed int32 NumPy array (`jaxinfer.engine.packing`), hands
it to the compiled program (its C++ dispatch path transfers it with the compiled, replicated
input sharding), donates the cache and the slot state, keeps the new ones, and returns the
step's packed output rows as a device array; the caller starts `copy_to_host_async()` on it and
reads it one step later.

Meshes. A runner runs one replica: dp = 1 (data-parallel replicas are separate engine cores,
`jaxinfer.engine.llm` offline and `serve/` engine-core processes). Tensor parallelism needs
nothing here: the parameters' shardings carry it and GSPMD partitions the step. With pp > 1
each program runs under `sharding.spmd.shard_map` with `pp` manual (tp automatic), and the slot
state and inputs are replicated over the stages (`jaxinfer/steps.py` says how the pipeline
runs).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import buckets, ops
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine import packing
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import PagedKVCache, cache_axes, init_cache
from jaxinfer.steps import (SlotState, SpecOptions, StepOptions, decode_step, init_slot_state,
                            prefill_step, speculative_step, verify_step)
from sharding.mesh import MeshSpec, check_model_fits
from sharding.rules import model_rules, tree_shardings
from sharding.spmd import mesh_context, replicated, shard_map, specs_of

logger = logging.getLogger(__name__)


def _local(out: jax.Array) -> jax.Array:
    """A step's replicated output as this process's own copy: under a mesh that spans several
    processes (multi-host) the global array cannot be read, its local replica can."""
    return out if out.is_fully_addressable else out.addressable_data(0)


class Runner:
    """The compiled programs of one model on one (pp, tp) mesh, and the cache and slot state.

    Program keys: ("decode", B, W, steps, full), ("prefill", R, T), ("verify", B, T, W) and,
    with a proposer, ("spec", B, W, k, full) for every speculative tier k > 0.

    Args:
        model_cfg: the model.
        engine_cfg: buckets and cache geometry; `num_pages` must be resolved.
        graphdef, params: the model's NNX graph and its placed parameters.
        mesh: a mesh with dp = 1.
        proposer: a `jaxinfer.speculative.api.Proposer` (speculative decoding), or None.
        spec: its `SpeculativeConfig` (tiers, verifier).
    """

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, graphdef, params, *,
                 mesh: jax.sharding.Mesh, proposer=None, spec=None) -> None:
        self.spec = MeshSpec.of(mesh)
        if self.spec.dp != 1:
            raise ConfigError(f"a runner runs one replica; got dp={self.spec.dp} (data-parallel "
                              "replicas are separate engines)")
        check_model_fits(self.spec, model_cfg)
        self.kernels = engine_cfg.resolved_kernels(jax.default_backend())
        ops.check_kernels(self.kernels)
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.num_slots = engine_cfg.num_slots
        self.full_width = max(buckets.page_widths(engine_cfg))
        self.num_stop = engine_cfg.max_stop_token_ids
        self.opts = StepOptions(kernels=self.kernels, unroll_layers=engine_cfg.layer_unroll,
                                reduce_dtype=engine_cfg.tp_reduce_dtype,
                                eos_ids=tuple(model_cfg.eos_token_ids),
                                num_logprobs=engine_cfg.max_logprobs,
                                num_stages=self.spec.pp)
        self._manual = ("pp",) if self.spec.pp > 1 else ()
        self._rep = replicated(mesh)
        self.cache_shardings = tree_shardings(mesh, cache_axes(engine_cfg),
                                              model_rules(model_cfg, mesh))
        self.cache: PagedKVCache | None = None
        self.state: SlotState | None = None
        self._exes: dict[tuple, Callable] = {}
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.warm = False
        self.on_late_compile: Callable[[tuple, float], None] | None = None
        self.proposer = proposer
        self.spec_cfg = spec
        self.pparams = proposer.params() if proposer is not None else None
        self.pstate = None
        self.spec_opts = None
        if proposer is not None:
            if self.spec.pp > 1:
                raise ConfigError(f"speculative decoding runs on meshes with pp = 1 (got pp="
                                  f"{self.spec.pp})")
            self.spec_opts = SpecOptions(
                acceptance="synthetic" if spec.method == "synthetic" else spec.acceptance,
                typical_threshold=spec.typical_threshold, typical_alpha=spec.typical_alpha)

    # -- state ---------------------------------------------------------------------------
    def init_state(self) -> None:
        """A zeroed cache and an all-inactive slot state (also after a failed step)."""
        self.cache = None
        self.state = None
        self.pstate = None
        self.cache = init_cache(self.model_cfg, self.engine_cfg, self.cache_shardings)
        history = (self.engine_cfg.max_seq_len
                   if self.proposer is not None and self.proposer.uses_history else 1)
        make = functools.partial(init_slot_state, self.num_slots, self.model_cfg.vocab_size,
                                 self.num_stop, history)
        self.state = jax.jit(make, out_shardings=self._rep)()
        if self.proposer is not None:
            self.pstate = self.proposer.init_state(self.num_slots, self.engine_cfg)

    def set_proposer_params(self, pparams) -> None:
        """Swap the proposer's parameters for a tree of the same structure, shapes and dtypes
        (the bench's acceptance sweep): the compiled programs take them as operands, so this
        compiles nothing."""
        self.pparams = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                                    pparams, self.pparams)

    def state_bytes(self) -> int:
        """Bytes of the slot state on one device (it is replicated)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.state))

    # -- programs ------------------------------------------------------------------------
    def program_keys(self) -> list[tuple]:
        """Every program warm-up compiles: decode (B, W, steps, full), prefill (R, T) and the
        speculative tiers (B, W, k, full)."""
        eng = self.engine_cfg
        spec = []
        if self.proposer is not None:
            spec = [("spec", b, w, k, full) for b, w in buckets.decode_shapes(eng)
                    for k in self.spec_tiers() if k > 0 for full in (False, True)]
        return ([("decode", b, w, steps, full)
                 for b, w in buckets.decode_shapes(eng)
                 for steps, full in buckets.decode_variants(eng)]
                + [("prefill", r, t) for r, t in buckets.prefill_shapes(eng)] + spec)

    def spec_tiers(self) -> tuple[int, ...]:
        """Speculative depths compiled (0 is plain decoding); () without a proposer."""
        return self.spec_cfg.active_tiers() if self.proposer is not None else ()

    def prefill_layout(self, chunk: int) -> packing.PrefillLayout:
        return packing.PrefillLayout(chunk, self.full_width, self.num_stop)

    def _wrap(self, body, *, with_state: bool):
        """`body` as run on the mesh: directly, or per pp stage under shard_map."""
        if not self._manual:
            return body
        cache_specs = specs_of(self.cache_shardings, self._manual)
        param_specs = specs_of(self.params, self._manual)
        rep = jax.sharding.PartitionSpec()
        if with_state:
            in_specs = (param_specs, cache_specs, rep, rep)
            out_specs = (cache_specs, rep, rep)
        else:
            in_specs = (param_specs, cache_specs, rep)
            out_specs = (cache_specs, rep)
        return shard_map(body, self.mesh, in_specs=in_specs, out_specs=out_specs,
                         manual=self._manual)

    def _program(self, key: tuple):
        """(function, abstract arguments, donated argument numbers, output shardings)."""

        def spec(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        def ints(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._rep)

        cache_spec = jax.tree.map(spec, self.cache)
        state_spec = jax.tree.map(spec, self.state)
        cache_out = self.cache_shardings
        state_out = jax.tree.map(lambda x: x.sharding, self.state)
        kind, graphdef, opts = key[0], self.graphdef, self.opts
        proposer = self.proposer
        if proposer is not None and kind in ("spec", "prefill"):
            pstate_spec = jax.tree.map(spec, self.pstate)
            pstate_out = jax.tree.map(lambda x: x.sharding, self.pstate)
            pparams = self.pparams
            if kind == "spec":
                _, b, w, k, full = key

                def body(params, pp, cache, state, pst, inputs):
                    return speculative_step(graphdef, params, pp, cache, state, pst, inputs,
                                            opts=opts, proposer=proposer,
                                            spec=self.spec_opts, k=k, full=full)

                args = (self.params, pparams, cache_spec, state_spec, pstate_spec,
                        ints(b, 1 + w))
            else:
                _, r, t = key
                layout = self.prefill_layout(t)

                def body(params, pp, cache, state, pst, inputs):
                    return prefill_step(graphdef, params, cache, state, inputs, opts=opts,
                                        layout=layout, proposer=proposer, pparams=pp,
                                        pstate=pst)

                args = (self.params, pparams, cache_spec, state_spec, pstate_spec,
                        ints(r, layout.row_width))
            return body, args, (2, 3, 4), (cache_out, state_out, pstate_out, self._rep)
        if kind == "decode":
            _, b, w, steps, full = key

            def body(params, cache, state, inputs):
                return decode_step(graphdef, params, cache, state, inputs, opts=opts,
                                   num_steps=steps, full=full)

            args = (self.params, cache_spec, state_spec, ints(b, 1 + w))
            return (self._wrap(body, with_state=True), args, (1, 2),
                    (cache_out, state_out, self._rep))
        if kind == "prefill":
            _, r, t = key
            layout = self.prefill_layout(t)

            def body(params, cache, state, inputs):
                return prefill_step(graphdef, params, cache, state, inputs, opts=opts,
                                    layout=layout)

            args = (self.params, cache_spec, state_spec, ints(r, layout.row_width))
            return (self._wrap(body, with_state=True), args, (1, 2),
                    (cache_out, state_out, self._rep))
        if kind == "verify":
            _, b, t, w = key

            def body(params, cache, inputs):
                return verify_step(graphdef, params, cache, inputs, opts=opts, chunk=t, width=w)

            args = (self.params, cache_spec, ints(b, t + w + 2))
            return self._wrap(body, with_state=False), args, (1,), (cache_out, self._rep)
        raise ValueError(f"unknown program {key!r}")

    def compile(self, key: tuple) -> Callable:
        """Compile (or fetch) the program for `key`; thread-safe, so warm-up can use a pool."""
        with self._lock:
            exe = self._exes.get(key)
        if exe is not None:
            return exe
        if self.cache is None:
            self.init_state()
        fn, args, donate, out_shardings = self._program(key)
        fn.__name__ = "step_" + "_".join(map(str, key))
        t0 = time.perf_counter()
        with mesh_context(self.mesh):  # `constrain` inside the model sees the mesh
            exe = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings
                          ).lower(*args).compile()
        dt = time.perf_counter() - t0
        with self._lock:
            if key in self._exes:
                return self._exes[key]
            self._exes[key] = exe
            self.num_compiles += 1
            self.compile_seconds += dt
        logger.info("compiled %s in %.2fs", key, dt)
        if self.warm and self.on_late_compile is not None:
            self.on_late_compile(key, dt)
        return exe

    def compile_all(self, *, max_workers: int,
                    progress: Callable[[tuple], None] | None = None) -> None:
        """Compile every warm-up program; XLA compiles release the GIL, so a pool overlaps
        them."""
        keys = self.program_keys()
        if self.cache is None:
            self.init_state()
        with concurrent.futures.ThreadPoolExecutor(max(1, min(max_workers, len(keys)))) as pool:
            futures = {pool.submit(self.compile, k): k for k in keys}
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
                if progress is not None:
                    progress(futures[fut])
        self.warm = True

    @property
    def compiled(self) -> types.MappingProxyType:
        """Read-only view of the compiled executables by key; `.as_text()` gives the HLO a
        test can inspect."""
        return types.MappingProxyType(self._exes)

    def _exe(self, key: tuple) -> Callable:
        exe = self._exes.get(key)
        return exe if exe is not None else self.compile(key)

    # -- steps ---------------------------------------------------------------------------
    def decode(self, inputs: np.ndarray, *, num_steps: int, full: bool) -> jax.Array:
        """Dispatch a decode step (asynchronously): inputs [B, 1 + W] int32 at a compiled
        (B, W); returns output rows [num_steps, B, C] (token -1 where a row was stopped)."""
        b, w1 = inputs.shape
        exe = self._exe(("decode", b, w1 - 1, num_steps, full))
        self.cache, self.state, out = exe(self.params, self.cache, self.state,
                                          np.ascontiguousarray(inputs, np.int32))
        return _local(out)

    def prefill(self, inputs: np.ndarray, *, chunk: int) -> jax.Array:
        """Dispatch a prefill step (asynchronously): inputs [R, PrefillLayout(chunk).row_width]
        at a compiled (R, chunk); returns output rows [R, 2 + 2k]."""
        exe = self._exe(("prefill", inputs.shape[0], chunk))
        inputs = np.ascontiguousarray(inputs, np.int32)
        if self.proposer is not None:
            self.cache, self.state, self.pstate, out = exe(
                self.params, self.pparams, self.cache, self.state, self.pstate, inputs)
            return _local(out)
        self.cache, self.state, out = exe(self.params, self.cache, self.state, inputs)
        return _local(out)

    def speculate(self, inputs: np.ndarray, *, k: int, full: bool) -> jax.Array:
        """Dispatch a speculative step (asynchronously): inputs [B, 1 + W] as for decode, k
        drafts per row; returns output rows [k + 2, B, C] (`steps.speculative_step`)."""
        b, w1 = inputs.shape
        exe = self._exe(("spec", b, w1 - 1, k, full))
        self.cache, self.state, self.pstate, out = exe(
            self.params, self.pparams, self.cache, self.state, self.pstate,
            np.ascontiguousarray(inputs, np.int32))
        return _local(out)

    def verify(self, inputs: np.ndarray, *, chunk: int, width: int) -> jax.Array:
        """Dispatch a verify step: inputs [B, chunk + width + 2] (tokens | block table | start
        | length); returns float32 logits [B, chunk, V] of every position."""
        exe = self._exe(("verify", inputs.shape[0], chunk, width))
        self.cache, logits = exe(self.params, self.cache, np.ascontiguousarray(inputs, np.int32))
        return _local(logits)

    def run_padding(self) -> None:
        """Run every warm-up program once on padding rows (no cache page or slot is touched but
        the scratch row): first-run costs are paid before traffic arrives."""
        scratch = self.num_slots
        out = None
        for key in self.program_keys():
            if key[0] in ("decode", "spec"):
                _, b, w, steps, full = key
                rows = packing.decode_rows(np.full(b, scratch, np.int32),
                                           np.zeros((b, w), np.int32))
                if key[0] == "spec":
                    out = self.speculate(rows, k=steps, full=full)
                else:
                    out = self.decode(rows, num_steps=steps, full=full)
            else:
                _, r, t = key
                out = self.prefill(self.prefill_layout(t).empty(r, scratch), chunk=t)
            out.block_until_ready()

    def step_costs(self, repeats: int = 8) -> dict[tuple[int, int], float]:
        """Seconds per dispatch of each speculative tier at each decode batch bucket, {(k, B):
        s} (k = 0: a plain decode dispatch of `decode_steps` tokens), on padding rows;
        adaptive depth weighs tiers with them. Each is timed over `repeats` dispatches in a
        row with one wait at the end, as the engine runs them (one step ahead): waiting on
        every dispatch adds a host round trip that served steps do not pay, which at small
        models rated a speculative step 1.7x its served cost (H200, our 37.5 M target at
        batch 1), so that tier was never chosen and never corrected. Padding rows read every
        weight but no KV, so long contexts cost somewhat more than measured here."""
        eng = self.engine_cfg
        scratch = self.num_slots
        w = self.full_width
        costs = {}
        for b in eng.batch_buckets:
            rows = packing.decode_rows(np.full(b, scratch, np.int32), np.zeros((b, w), np.int32))
            for k in self.spec_tiers():
                def dispatch():
                    if k == 0:
                        return self.decode(rows, num_steps=eng.decode_steps, full=False)
                    return self.speculate(rows, k=k, full=False)
                dispatch().block_until_ready()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    out = dispatch()
                out.block_until_ready()
                costs[(k, b)] = (time.perf_counter() - t0) / repeats
        return costs

    def close(self) -> None:
        """Release what the runner holds besides device arrays (nothing here; a multi-host
        leader's subclass tells its followers to stop)."""
