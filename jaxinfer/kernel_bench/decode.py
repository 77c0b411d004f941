"""Paged decode attention rows for `python -m jaxinfer.bench kernels --ops decode`.

Our flash-decoding kernel (`pallas_kernels.paged_decode_attention`) beside the anchors DESIGN.md
section 4 names: the XLA reference over the same pages (`paged_attention_reference`, which
gathers each sequence's pages into a contiguous copy) and JAX's own Pallas paged kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`, Triton, T = 1 only, per-layer pool
`[K, P, G, H]`, per-token scales `[K, P, G]`: ours are broadcast to that layout outside the timed
call). All read pages of 16 scattered over the pool through a shuffled block table. An anchor
that fails (API drift between jax versions, no GPU) becomes a row with an `error` field.

Shapes (32 q / 8 kv heads, bf16 queries): B=64 at context 2048 and B=8 at context 16384, with
bf16, int8 and fp8 pages, head_dim 128 and 64 (Llama-3.2-1B); plus T=4 verification at B=64.
The rate is `kv_gbps`: the K and V bytes the context needs (whole pages, scales included) over
the kernel time - the roofline of a bandwidth-bound kernel.

`tuning_rows` sweeps a few `DecodeTuning`s on one shape (impl `ours` with the knobs as fields),
for picking the defaults on a new GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernel_bench import base_row, on_gpu, time_kernel
from pallas_kernels import paged_decode_attention as pda
from pallas_kernels.paged_attention import paged_attention_reference

logger = logging.getLogger(__name__)

_QUANTIZED = ("int8", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    ctx: int  # cached tokens per sequence, this step's included
    heads: int
    kv_heads: int
    head_dim: int
    kv_dtype: str = "bfloat16"
    t: int = 1  # query tokens per sequence (the last t positions)
    page_size: int = 16
    q_dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        t = f",T={self.t}" if self.t > 1 else ""
        return (f"B={self.batch},ctx={self.ctx}{t},N={self.heads}/{self.kv_heads},"
                f"H={self.head_dim},G={self.page_size},kv={self.kv_dtype}")

    @property
    def pages_per_seq(self) -> int:
        return -(-self.ctx // self.page_size)

    @property
    def kv_bytes(self) -> int:
        """K + V bytes the context needs: whole pages, plus per-page-per-head scales."""
        pages = self.batch * self.pages_per_seq * self.kv_heads
        per_page = self.page_size * self.head_dim * jnp.dtype(self.kv_dtype).itemsize
        scales = 4 if self.kv_dtype in _QUANTIZED else 0
        return 2 * pages * (per_page + scales)


def case_list(quick: bool) -> list[Case]:
    if quick:
        return [Case(batch=2, ctx=77, heads=4, kv_heads=2, head_dim=64),
                Case(batch=2, ctx=77, heads=4, kv_heads=2, head_dim=64, kv_dtype="int8"),
                Case(batch=2, ctx=50, heads=4, kv_heads=2, head_dim=64, t=4)]
    out = []
    for batch, ctx in ((64, 2048), (8, 16384)):
        for kv in ("bfloat16", "int8", "float8_e4m3fn"):
            out.append(Case(batch=batch, ctx=ctx, heads=32, kv_heads=8, head_dim=128,
                            kv_dtype=kv))
    out += [Case(batch=64, ctx=2048, heads=32, kv_heads=8, head_dim=64),
            Case(batch=64, ctx=2048, heads=32, kv_heads=8, head_dim=64, kv_dtype="int8"),
            Case(batch=8, ctx=16384, heads=32, kv_heads=8, head_dim=64),
            Case(batch=64, ctx=2048, heads=32, kv_heads=8, head_dim=128, t=4)]
    return out


def make_inputs(c: Case, seed: int) -> dict:
    """Random q [B, T, N, H] and a one-layer pool [1, K, P, G, H] (plus scales [1, K, P] for
    8-bit pages) holding each sequence's pages at shuffled ids (a spare page per sequence)."""
    rng = np.random.default_rng(seed)
    w = c.pages_per_seq
    num_pages = c.batch * (w + 1)
    tables = rng.permutation(num_pages)[: c.batch * w].reshape(c.batch, w).astype(np.int32)
    shape = (1, c.kv_heads, num_pages, c.page_size, c.head_dim)
    key = jax.random.key(seed)
    kk, kv, kq, ks = jax.random.split(key, 4)
    out = {}
    for name, k in (("k", kk), ("v", kv)):
        if c.kv_dtype == "int8":
            out[name] = jax.random.randint(k, shape, -127, 128, jnp.int32).astype(jnp.int8)
        else:
            out[name] = jax.random.normal(k, shape, jnp.float32).astype(c.kv_dtype)
        if c.kv_dtype in _QUANTIZED:
            lo = 0.005 if c.kv_dtype == "int8" else 0.1
            out[name + "_scale"] = jax.random.uniform(jax.random.fold_in(ks, ord(name)),
                                                      shape[:3], jnp.float32, lo, 2 * lo)
        else:
            out[name + "_scale"] = None
    out["q"] = jax.random.normal(kq, (c.batch, c.t, c.heads, c.head_dim), jnp.float32).astype(
        c.q_dtype)
    out["tables"] = jnp.asarray(tables)
    out["lens"] = jnp.full((c.batch,), c.ctx, jnp.int32)
    out["positions"] = jnp.broadcast_to(jnp.arange(c.ctx - c.t, c.ctx, dtype=jnp.int32),
                                        (c.batch, c.t))
    return out


def _args(x: dict) -> tuple:
    quant = () if x["k_scale"] is None else (x["k_scale"], x["v_scale"])
    return (x["q"], x["k"], x["v"], x["tables"], x["lens"], x["positions"], *quant)


def _ours(c: Case, cfg: pda.DecodeTuning) -> Callable:
    interpret = not on_gpu()

    def fn(q, kp, vp, bt, sl, pos, ks=None, vs=None):
        return pda.paged_decode_attention(q, kp, vp, 0, bt, sl, pos, k_scale=ks, v_scale=vs,
                                          scale=c.head_dim ** -0.5, cfg=cfg, interpret=interpret)
    return fn


def _xla(c: Case) -> Callable:
    def fn(q, kp, vp, bt, sl, pos, ks=None, vs=None):
        return paged_attention_reference(q, kp, vp, 0, bt, sl, pos, k_scale=ks, v_scale=vs,
                                         scale=c.head_dim ** -0.5)
    return fn


def _jax_paged_args(x: dict) -> tuple:
    """The anchor's layout: q [B, N, H] pre-scaled (it applies no softmax scale), one layer's
    pool [K, P, G, H], per-token scales [K, P, G]."""
    q = x["q"][:, 0]
    q = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
    g = x["k"].shape[3]
    scales = () if x["k_scale"] is None else tuple(
        jnp.repeat(x[n][0][..., None], g, axis=-1) for n in ("k_scale", "v_scale"))
    return (q, x["k"][0], x["v"][0], x["tables"], x["lens"], *scales)


def _anchor_tiling(pages_per_seq: int) -> dict:
    """The anchor's defaults (k_splits 16, 8 pages per block) where the table width allows:
    it asserts that both divide the width."""
    splits = max(s for s in range(1, 17) if pages_per_seq % s == 0)
    part = pages_per_seq // splits
    ppcb = max(p for p in range(1, 9) if part % p == 0)
    return dict(block_h=16, k_splits=splits, pages_per_compute_block=ppcb)


def _jax_paged(tiling: dict) -> Callable:
    def fn(q, kp, vp, bt, lens, ks=None, vs=None):
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
        out = jpa.paged_attention(q, kp, vp, bt, lens, ks, vs, **tiling, interpret=not on_gpu())
        return out[:, None]
    return fn


def _error_row(c: Case, impl: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__
    return base_row(op="decode", impl=impl, shape=c.label, metric="error", value=None, unit="",
                    error=msg)


def _rows(c: Case, impl: str, seconds: float, fields: dict) -> Iterator[dict]:
    common = dict(op="decode", impl=impl, shape=c.label, batch=c.batch, ctx=c.ctx, t=c.t,
                  heads=c.heads, kv_heads=c.kv_heads, head_dim=c.head_dim,
                  page_size=c.page_size, kv_dtype=c.kv_dtype, dtype=c.q_dtype, **fields)
    yield base_row(metric="time_us", value=seconds * 1e6, unit="us", **common)
    yield base_row(metric="kv_gbps", value=c.kv_bytes / seconds / 1e9, unit="GB/s", **common)


def _tuning_fields(c: Case, cfg: pda.DecodeTuning) -> dict:
    itemsize = jnp.dtype(c.kv_dtype).itemsize
    ppb = pda.block_pages(cfg, c.page_size, itemsize, c.pages_per_seq)
    splits = pda.choose_splits(cfg, c.batch * c.kv_heads, -(-c.pages_per_seq // ppb))
    out = dict(pages_per_block=ppb, k_splits=splits, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
    if c.kv_dtype in _QUANTIZED:
        out["quantized_compute"] = cfg.quantized_compute
    if splits == 1:
        out["normalize_single_split"] = cfg.normalize_single_split
    return out


def run_case(c: Case, *, iterations: int, cfg: pda.DecodeTuning = pda.DEFAULT,
             num_sets: int = 2, anchors: bool = True) -> Iterator[dict]:
    """Time ours, XLA and (T = 1) JAX's paged kernel on one shape: time_us and kv_gbps rows,
    each with its largest difference from the XLA reference on the first input set."""
    sets = [make_inputs(c, seed) for seed in range(num_sets)]
    reference = np.asarray(jax.jit(_xla(c))(*_args(sets[0])), np.float32)
    impls: list[tuple[str, Callable, Callable, dict]] = [
        ("ours", _ours(c, cfg), _args, _tuning_fields(c, cfg))]
    if anchors:
        impls.append(("xla", _xla(c), _args, {}))
        if c.t == 1:
            tiling = _anchor_tiling(c.pages_per_seq)
            impls.append(("jax_pallas_paged", _jax_paged(tiling), _jax_paged_args, tiling))
    for impl, fn, to_args, fields in impls:
        try:
            arg_sets = [to_args(x) for x in sets]
            seconds = time_kernel(fn, arg_sets, iterations=iterations)
            got = np.asarray(jax.jit(fn)(*arg_sets[0]), np.float32)
            fields = dict(fields, max_abs_err_vs_xla=float(np.max(np.abs(got - reference))))
        except Exception as e:
            if impl in ("ours", "xla"):
                raise  # our own code failing is a bug, not an anchor's API drift
            logger.warning("decode %s failed on %s: %s", impl, c.label, e)
            yield _error_row(c, impl, e)
            continue
        yield from _rows(c, impl, seconds, fields)


TUNINGS = (
    pda.DEFAULT,
    dataclasses.replace(pda.DEFAULT, num_stages=2),
    dataclasses.replace(pda.DEFAULT, num_stages=4),
    dataclasses.replace(pda.DEFAULT, pages_per_block=8, num_stages=2),
    dataclasses.replace(pda.DEFAULT, num_warps=8),
    dataclasses.replace(pda.DEFAULT, min_programs=512),
    dataclasses.replace(pda.DEFAULT, min_programs=2048),
    dataclasses.replace(pda.DEFAULT, quantized_compute="query"),
)


def tuning_rows(c: Case, *, iterations: int, tunings=TUNINGS) -> Iterator[dict]:
    """Our kernel alone under several tunings (rows carry the resolved knobs)."""
    for cfg in tunings:
        try:
            yield from run_case(c, iterations=iterations, cfg=cfg, anchors=False)
        except Exception as e:  # a tuning that does not compile is a data point, not a stop
            logger.warning("decode tuning %s failed on %s: %s", cfg, c.label, e)
            yield _error_row(c, "ours", e) | _tuning_fields(c, cfg)


def cases(args) -> Iterator[dict]:
    """Rows for every shape (`args.quick`: tiny shapes for a CPU smoke run)."""
    iterations = 3 if args.quick else args.iterations
    for c in case_list(args.quick):
        if c.kv_dtype == "float8_e4m3fn" and on_gpu():
            cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
            if cc < 8.9:
                yield _error_row(c, "ours", RuntimeError(f"fp8 pages need sm89+, got sm{cc}"))
                continue
        yield from run_case(c, iterations=iterations)
