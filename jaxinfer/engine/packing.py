"""The one packing of per-row data between host and device: no JAX here, only layouts.

Every device step takes its host inputs as ONE int32 array (one transfer per call) and returns
ONE int32 array (one read-back per call). This module is the only place that knows the columns;
the scheduler writes rows with it (`PrefillLayout.pack_*`), the device steps
(`jaxinfer/steps.py`) read the same columns, and output rows are parsed here
(`unpack_logprobs`).

A sampling row is a sequence's decoding parameters as the device keeps them per slot:

    float32 [NUM_FLOAT]: FLOAT_FIELDS   (neutral values: NEUTRAL_FLOATS)
    int32   [NUM_INT]:   INT_FIELDS     (top_k, the PRNG key's two words, logprobs, ignore_eos)

A prefill row (one sequence's chunk) is, in order:

    tokens [T] | block table [W] | META_FIELDS | int params [NUM_INT] | stop ids [S] |
    float params [NUM_FLOAT] as int32 bits

A decode row is `slot | block table [W]`. An output row is

    token | logprob (float32 bits) | top-k ids [k] | top-k logprobs (float32 bits) [k]

and the greedy programs return only the token column.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")
NEUTRAL_FLOATS = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # greedy, no filter, no penalty
INT_FIELDS = ("top_k", "key_hi", "key_lo", "logprobs", "ignore_eos")
NUM_FLOAT = len(FLOAT_FIELDS)
NUM_INT = len(INT_FIELDS)
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY = range(NUM_FLOAT)
I_TOP_K, I_KEY_HI, I_KEY_LO, I_LOGPROBS, I_IGNORE_EOS = range(NUM_INT)

# slot, first position of the chunk, chunk length (0: padding row), 1 when the chunk ends the
# known tokens (sample the next one), prompt length (penalties count later positions as
# output), max_len (prompt + max_tokens: the row stops on device when it gets there)
META_FIELDS = ("slot", "start", "length", "sample", "prompt_len", "max_len")
NUM_META = len(META_FIELDS)
M_SLOT, M_START, M_LENGTH, M_SAMPLE, M_PROMPT_LEN, M_MAX_LEN = range(NUM_META)


def seed_key(seed: int) -> tuple[int, int]:
    """The two 32-bit words of a row's raw PRNG key, as int32 (the device reads them back as
    uint32 bits: `jax.random.wrap_key_data`)."""
    seed = int(seed) % 2**64
    words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return tuple(int(x) for x in words.view(np.int32))


def sampling_row(*, temperature: float = 0.0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, top_k: int = 0, seed: int = 0,
                 logprobs: int = 0, ignore_eos: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [NUM_FLOAT], int32 [NUM_INT]) for one sequence."""
    floats = np.array([temperature, top_p, min_p, repetition_penalty, presence_penalty,
                       frequency_penalty], np.float32)
    hi, lo = seed_key(seed)
    ints = np.array([top_k, hi, lo, int(logprobs > 0), int(bool(ignore_eos))], np.int32)
    return floats, ints


def neutral_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampling rows of padding: greedy, no filters, no penalties."""
    return (np.tile(np.asarray(NEUTRAL_FLOATS, np.float32), (n, 1)),
            np.zeros((n, NUM_INT), np.int32))


def is_penalized(floats: np.ndarray) -> bool:
    return bool(floats[F_REPETITION] != 1 or floats[F_PRESENCE] != 0
                or floats[F_FREQUENCY] != 0)


def needs_full_sampler(floats: np.ndarray, ints: np.ndarray) -> bool:
    """Whether a row needs more than argmax: it samples, is penalized or wants logprobs."""
    return bool(floats[F_TEMPERATURE] > 0 or is_penalized(floats) or ints[I_LOGPROBS])


@dataclasses.dataclass(frozen=True)
class PrefillLayout:
    """Columns of a prefill row for chunk length T, block-table width W and S stop ids."""

    chunk: int  # T
    width: int  # W
    num_stop: int  # S

    @property
    def tokens(self) -> slice:
        return slice(0, self.chunk)

    @property
    def block_table(self) -> slice:
        return slice(self.chunk, self.chunk + self.width)

    @property
    def meta(self) -> slice:
        start = self.chunk + self.width
        return slice(start, start + NUM_META)

    @property
    def ints(self) -> slice:
        start = self.meta.stop
        return slice(start, start + NUM_INT)

    @property
    def stop_ids(self) -> slice:
        start = self.ints.stop
        return slice(start, start + self.num_stop)

    @property
    def floats(self) -> slice:
        start = self.stop_ids.stop
        return slice(start, start + NUM_FLOAT)

    @property
    def row_width(self) -> int:
        return self.floats.stop

    def empty(self, rows: int, scratch_slot: int) -> np.ndarray:
        """[rows, row_width] of padding rows (length 0, the scratch slot, neutral sampling)."""
        out = np.zeros((rows, self.row_width), np.int32)
        out[:, self.meta.start + M_SLOT] = scratch_slot
        out[:, self.stop_ids] = -1
        out[:, self.floats] = np.asarray(NEUTRAL_FLOATS, np.float32).view(np.int32)
        return out

    def pack_row(self, out: np.ndarray, i: int, *, tokens: np.ndarray, block_table: np.ndarray,
                 slot: int, start: int, sample: bool, prompt_len: int, max_len: int,
                 floats: np.ndarray, ints: np.ndarray, stop_ids: np.ndarray) -> None:
        """Write row i of `out` (from `empty`)."""
        row = out[i]
        n = len(tokens)
        row[: n] = tokens
        row[self.block_table.start: self.block_table.start + len(block_table)] = block_table
        row[self.meta] = (slot, start, n, int(sample), prompt_len, max_len)
        row[self.ints] = ints
        row[self.stop_ids.start: self.stop_ids.start + len(stop_ids)] = stop_ids
        row[self.floats] = floats.view(np.int32)


def decode_rows(slots: np.ndarray, block_tables: np.ndarray) -> np.ndarray:
    """[B, 1 + W] int32: each decode row's slot, then its block table."""
    return np.ascontiguousarray(np.concatenate([slots[:, None], block_tables], axis=1),
                                np.int32)


def output_width(num_logprobs: int, *, full: bool) -> int:
    """Columns of an output row: the token, then (full sampler) logprob and top-k."""
    return 2 + 2 * num_logprobs if full else 1


def unpack_logprobs(row: np.ndarray, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(logprob of the chosen token, k (id, logprob) pairs most likely first) of an output row
    of the full sampler."""
    kmax = (len(row) - 2) // 2
    lp = float(row[1:2].view(np.float32)[0])
    ids = row[2: 2 + kmax]
    lps = row[2 + kmax: 2 + 2 * kmax].view(np.float32)
    return lp, tuple((int(ids[i]), float(lps[i])) for i in range(min(k, kmax)))
