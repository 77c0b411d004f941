"""Prefill attention rows for `python -m jaxinfer.bench kernels --ops prefill`.

Our paged flash kernel (`pallas_kernels.flash_attention`) beside the anchors DESIGN.md section 4
names: the XLA reference over the same pages, cuDNN through `jax.nn.dot_product_attention`, and
JAX's own Pallas kernels, `mha` (Triton) and `attention_mgpu` (Mosaic GPU, FA3-style). The
anchors read contiguous `[B, S, heads, H]` q/k/v, the best case for them; ours reads pages of 16
scattered over the pool through a shuffled block table, as serving does. Anchors without GQA
get K/V repeated to the q heads beforehand (outside the timed call). An anchor that fails (API
drift between jax versions, no GPU) becomes a row with an `error` field.

Shapes: B=4, S=4096, causal, 32 q / 8 kv heads, head_dim 128 and 64 (Llama-3.2-1B), bf16; and
a chunk of 512 queries at offset 3584 of 4096 (chunked prefill, prefix hit), where the
contiguous anchors do not apply (their causal mask is not offset) and only XLA is compared.
FLOPs count the visible half of the score matrix: 4*B*N*S*S*H/2 for the whole prompt,
4*B*N*H*(T*(S-T) + T*T/2) for a chunk of T at the end of S.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernel_bench import base_row, on_gpu, time_kernel
from pallas_kernels import flash_attention as fa

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int  # S: keys per sequence (cached + this chunk)
    chunk: int  # T: queries, the last T positions of the sequence
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        start = self.seq - self.chunk
        pre = f"S={self.seq}" if start == 0 else f"T={self.chunk}@{start}"
        return (f"B={self.batch},{pre},N={self.heads}/{self.kv_heads},H={self.head_dim},"
                f"G={self.page_size},{self.dtype}")

    @property
    def flops(self) -> float:
        t, s = self.chunk, self.seq
        return 4.0 * self.batch * self.heads * self.head_dim * (t * (s - t) + t * t / 2)


def case_list(quick: bool) -> list[Case]:
    if quick:
        return [Case(batch=1, seq=128, chunk=128, heads=4, kv_heads=2, head_dim=64),
                Case(batch=1, seq=128, chunk=32, heads=4, kv_heads=2, head_dim=64)]
    return [Case(batch=4, seq=4096, chunk=4096, heads=32, kv_heads=8, head_dim=128),
            Case(batch=4, seq=4096, chunk=4096, heads=32, kv_heads=8, head_dim=64),
            Case(batch=4, seq=4096, chunk=512, heads=32, kv_heads=8, head_dim=128)]


def make_inputs(c: Case, seed: int) -> dict:
    """Random q [B,T,N,H] and k/v [B,S,K,H], plus the same keys scattered into a page pool
    [1, K, P, G, H] through a shuffled block table [B, S/G]."""
    dt = jnp.dtype(c.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (c.batch, c.chunk, c.heads, c.head_dim), dt)
    k = jax.random.normal(kk, (c.batch, c.seq, c.kv_heads, c.head_dim), dt)
    v = jax.random.normal(kv, (c.batch, c.seq, c.kv_heads, c.head_dim), dt)
    w = c.seq // c.page_size
    num_pages = c.batch * w
    perm = np.random.default_rng(seed).permutation(num_pages).astype(np.int32)
    block_tables = jnp.asarray(perm.reshape(c.batch, w))

    def paged(x):  # [B, S, K, H] -> [1, K, P, G, H] at the table's pages
        x = x.reshape(c.batch, w, c.page_size, c.kv_heads, c.head_dim).transpose(3, 0, 1, 2, 4)
        pool = jnp.zeros((c.kv_heads, num_pages, c.page_size, c.head_dim), dt)
        return pool.at[:, block_tables.reshape(-1)].set(
            x.reshape(c.kv_heads, num_pages, c.page_size, c.head_dim))[None]

    start = c.seq - c.chunk
    positions = jnp.broadcast_to(jnp.arange(start, c.seq, dtype=jnp.int32), (c.batch, c.chunk))
    return dict(q=q, k=k, v=v, k_pages=paged(k), v_pages=paged(v), block_tables=block_tables,
                seq_lens=jnp.full((c.batch,), c.seq, jnp.int32), positions=positions)


def _paged_args(x: dict) -> tuple:
    return (x["q"], x["k_pages"], x["v_pages"], x["block_tables"], x["seq_lens"],
            x["positions"])


def _repeat_kv(x: dict, heads: int) -> tuple:
    rep = heads // x["k"].shape[2]
    return x["q"], jnp.repeat(x["k"], rep, axis=2), jnp.repeat(x["v"], rep, axis=2)


def _impls(c: Case, cfg: fa.FlashTuning) -> list[tuple[str, list[tuple]]]:
    """(impl name, candidates) per implementation; a candidate is (fn, inputs dict -> args,
    extra row fields), and the first candidate that runs is timed."""
    scale = c.head_dim ** -0.5
    interpret = not on_gpu()

    def ours(q, kp, vp, bt, sl, pos):
        return fa.flash_prefill_attention(q, kp, vp, 0, bt, sl, pos, scale=scale, cfg=cfg,
                                          interpret=interpret)

    def xla(q, kp, vp, bt, sl, pos):
        return fa.flash_prefill_attention_reference(q, kp, vp, 0, bt, sl, pos, scale=scale)

    tuned = cfg.for_head_dim(c.head_dim)
    tuning = dict(block_q=tuned.block_q, block_kv=tuned.block_kv, num_warps=tuned.num_warps,
                  num_stages=tuned.num_stages, pack_heads=tuned.pack_heads)
    out = [("ours", [(ours, _paged_args, tuning)]), ("xla", [(xla, _paged_args, {})])]
    if c.chunk != c.seq:
        return out

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")

    def mha(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention
        return attention.mha(q, k, v, None, sm_scale=scale, causal=True, interpret=interpret)

    def mgpu(q, k, v, block_kv):
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        conf = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv,
                                           max_concurrent_steps=2, causal=True)
        return attention_mgpu.attention(q, k, v, conf)

    contiguous = lambda x: (x["q"], x["k"], x["v"])  # noqa: E731
    # attention_mgpu stages tiles in float16 shared memory: give it float16 inputs.
    as_f16 = lambda x: tuple(a.astype(jnp.float16) for a in contiguous(x))  # noqa: E731
    repeated = functools.partial(_repeat_kv, heads=c.heads)
    out.append(("cudnn", [(cudnn, contiguous, dict(gqa="native")),
                          (cudnn, repeated, dict(gqa="repeated"))]))
    out.append(("jax_pallas_mha", [(mha, repeated, dict(gqa="repeated", block_q=128,
                                                        block_kv=128))]))
    # attention_mgpu's own benchmark takes the largest block_kv whose buffers fit in shared
    # memory (256, else 128, else 64); so do we. It applies no softmax scale and supports only
    # float16 here (timing only).
    out.append(("jax_pallas_mgpu", [
        (functools.partial(mgpu, block_kv=bkv), as_f16,
         dict(gqa="native", block_q=64, block_kv=bkv, input_dtype="float16"))
        for bkv in (256, 128, 64)]))
    return out


def _error_row(c: Case, impl: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__
    return base_row(op="prefill", impl=impl, shape=c.label, metric="error", value=None,
                    unit="", error=msg)


_GPU_ONLY = ("cudnn", "jax_pallas_mgpu")  # no interpret mode; mha has one


def run_case(c: Case, *, iterations: int, cfg: fa.FlashTuning = fa.DEFAULT,
             num_sets: int = 2) -> Iterator[dict]:
    """Time every implementation on one shape; yields time_us and tflops rows per impl.
    Implementations computing the same function as ours (XLA, cuDNN) also report their
    largest difference from the XLA reference on the first input set."""
    sets = [make_inputs(c, seed) for seed in range(num_sets)]
    impls = _impls(c, cfg)
    reference = None
    for impl, candidates in impls:
        if impl in _GPU_ONLY and not on_gpu():
            yield _error_row(c, impl, RuntimeError("needs an NVIDIA GPU"))
            continue
        for i, (fn, to_args, extra) in enumerate(candidates):
            try:
                arg_sets = [to_args(x) for x in sets]
                seconds = time_kernel(fn, arg_sets, iterations=iterations)
                fields = dict(extra)
                if impl in ("ours", "xla", "cudnn"):
                    if reference is None:
                        ref_fn, ref_args, _ = impls[1][1][0]
                        reference = np.asarray(jax.jit(ref_fn)(*ref_args(sets[0])), np.float32)
                    got = np.asarray(jax.jit(fn)(*arg_sets[0]), np.float32)
                    fields["max_abs_err_vs_xla"] = float(np.max(np.abs(got - reference)))
            except Exception as e:  # an anchor's API drift must not stop the bench
                logger.warning("prefill %s %s failed: %s", impl, extra, e)
                if i + 1 < len(candidates):
                    continue
                yield _error_row(c, impl, e)
                break
            common = dict(op="prefill", impl=impl, shape=c.label, batch=c.batch, seq=c.seq,
                          chunk=c.chunk, heads=c.heads, kv_heads=c.kv_heads,
                          head_dim=c.head_dim, page_size=c.page_size, dtype=c.dtype, **fields)
            yield base_row(metric="time_us", value=seconds * 1e6, unit="us", **common)
            yield base_row(metric="tflops", value=c.flops / seconds / 1e12, unit="TFLOP/s",
                           **common)
            break


def cases(args) -> Iterator[dict]:
    """Rows for every shape (`args.quick`: tiny shapes for a CPU smoke run)."""
    iterations = 3 if args.quick else args.iterations
    for c in case_list(args.quick):
        yield from run_case(c, iterations=iterations)
