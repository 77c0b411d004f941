"""End to end: `--kernels pallas` generates the reference kernels' greedy tokens.

On CPU the Pallas kernels run in interpret mode, so the models are the tiny random-weight
Hugging Face checkpoints of `test_hf_parity.py` (float32) and few tokens are generated. Prompts
are longer than `ops.DECODE_MAX_T`, so prefill runs the flash prefill kernel and decoding the
paged decode kernel. The chunked case uses small prefill buckets so later chunks attend to pages
cached by earlier ones (and, for Mistral, a sliding window crosses chunk boundaries).

The GPU test runs the Llama-3.2-1B shape in bf16 with random weights and requires the same 32
greedy tokens from both kernel choices. Both sides are deterministic, but they round in
different places (bf16 probabilities, summation order), so a near-tie between the top two
logits can flip one greedy token. On a divergence the test measures the reference's own logit
margin between the two candidate tokens there (one reference prefill of the context): within
bf16 noise (`NEAR_TIE`) the test xfails with the details, otherwise it fails. Random weights
give logits with small gaps, so expect the xfail: on an H100 (seed 0) a split came at a gap of
0.026 (layer scan) and, with 4 layers per loop iteration, at 0.004 after 32 + 8 equal tokens.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxinfer import generate  # noqa: E402
from jaxinfer.config import EngineConfig  # noqa: E402
from jaxinfer.engine.llm import LLM  # noqa: E402
from jaxinfer.model_loader import load_model  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from tests.jaxinfer.test_hf_parity import _hf_model  # noqa: E402

MODELS = ("llama_gqa", "mistral_sliding_window")  # GQA 4/2; sliding window 8
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11],
           [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
NEW_TOKENS = 6
NEAR_TIE = 0.1  # |logit gap| within bf16 noise at logits of this size


@pytest.fixture(scope="module", params=MODELS)
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "hf"
    _hf_model(request.param, path)
    return path


def _cli_tokens(model_dir, kernels: str, capsys) -> list[list[int]]:
    argv = ["--model", str(model_dir), "--max-new-tokens", str(NEW_TOKENS), "--json",
            "--kernels", kernels]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert generate.main(argv) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow  # the kernels end to end: the chunked-prefill test below in the gate
def test_cli_pallas_matches_reference(hf_dir, capsys):
    want = _cli_tokens(hf_dir, "reference", capsys)
    assert [len(t) for t in want] == [NEW_TOKENS] * len(PROMPTS)
    assert _cli_tokens(hf_dir, "pallas", capsys) == want


def test_chunked_prefill_pallas_matches_reference(hf_dir):
    """Prompts of 37 and 21 tokens in chunks of 16: chunks 2+ read earlier chunks' pages."""
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model(str(hf_dir), mesh=mesh, dtype="float32")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, 37).tolist(), rng.integers(0, 256, 21).tolist()]
    tokens = {}
    for kernels in ("reference", "pallas"):
        engine = EngineConfig(page_size=4, num_pages=64, max_seq_len=48, dtype="float32",
                              prefill_buckets=(16,), prefill_rows=(2,), batch_buckets=(2,),
                              decode_steps=4, kernels=kernels)
        tokens[kernels] = _greedy(LLM.from_loaded(loaded, engine, mesh=mesh), prompts, 4)
    assert [len(t) for t in tokens["reference"]] == [4, 4]
    assert tokens["pallas"] == tokens["reference"]


def _greedy(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    out = llm.generate([llm.request(p, max_tokens=max_tokens) for p in prompts])
    return [c.token_ids for [c] in out]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _reference_margin(llm: LLM, context: list[int], a: int, b: int) -> float:
    """logit[a] - logit[b] after `context`, from the reference kernels' verify program."""
    row = llm.prompt_logits(context)[-1]
    return float(row[a] - row[b])


@pytest.mark.gpu
def test_llama_1b_shape_bf16_pallas_matches_reference():
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model("llama-3.2-1b-shape", mesh=mesh, dtype="bfloat16", seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128000, 100).tolist(), rng.integers(0, 128000, 37).tolist()]
    tokens, llms = {}, {}
    for kernels in ("reference", "pallas"):
        engine = EngineConfig(page_size=16, num_pages=64, max_seq_len=256, dtype="bfloat16",
                              batch_buckets=(1, 2), kernels=kernels)
        llms[kernels] = LLM.from_loaded(loaded, engine, mesh=mesh)
        tokens[kernels] = _greedy(llms[kernels], prompts, 32)
    for i, (want, got) in enumerate(zip(tokens["reference"], tokens["pallas"])):
        assert len(want) == 32
        step = _first_divergence(want, got)
        if step is not None:  # say whether the reference itself saw a near-tie there
            margin = _reference_margin(llms["reference"], prompts[i] + want[:step], want[step],
                                       got[step])
            msg = (f"prompt {i}: pallas diverges from reference at generated token {step} "
                   f"(context {len(prompts[i]) + step}): {got[step:step + 4]} vs "
                   f"{want[step:step + 4]}; reference logit margin of its token over pallas' "
                   f"token: {margin:.4f}")
            if abs(margin) < NEAR_TIE:  # a bf16 rounding flip, never counted as a pass
                pytest.xfail("near-tie: " + msg)
            pytest.fail(msg)
