"""Numerics against Hugging Face transformers (PyTorch CPU) on random-weight checkpoints.

Tolerance: float32 everywhere; last-position logits must match within atol 2e-4 (logits are
O(1) here), and greedy tokens must be identical for 24 new tokens, both when loading the HF
directory directly and after `checkpoints.convert`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints import convert  # noqa: E402
from jaxinfer.config import EngineConfig  # noqa: E402
from jaxinfer.engine.llm import LLM  # noqa: E402
from jaxinfer.model_loader import load_model  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

NEW_TOKENS = 24
LOGIT_ATOL = 2e-4

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)

CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3_rope_tied_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, num_key_value_heads=1, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [11, 200], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]


def _hf_model(name: str, path):
    cfg_cls, model_cls, extra = CASES[name]
    kwargs = {**COMMON, **extra}
    if cfg_cls == "MistralConfig" or cfg_cls == "Qwen2Config":
        kwargs["head_dim"] = 16
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval().to(torch.float32)
    if name == "qwen2_bias":  # HF zero-inits biases; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, safe_serialization=True)


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].numpy()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist(), logits


def _llm(model_dir, speculative: str | None = None) -> LLM:
    mesh = make_mesh("dp=1", devices=[__import__("jax").devices()[0]])
    loaded = load_model(str(model_dir), mesh=mesh, dtype="float32")
    # One shape of each program: numerics do not depend on the bucket (tests/jaxinfer/
    # test_generate.py checks that a batch equals its rows alone across buckets).
    engine = EngineConfig(page_size=4, num_pages=128, max_seq_len=64, dtype="float32",
                          prefill_buckets=(16,), prefill_rows=(4,), batch_buckets=(4,),
                          decode_steps=5, speculative_config=speculative)
    return LLM.from_loaded(loaded, engine, mesh=mesh)


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    out = llm.generate([llm.request(p, max_tokens=NEW_TOKENS) for p in prompts])
    return [c.token_ids for [c] in out]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    hf_dir = tmp_path_factory.mktemp(name) / "hf"
    _hf_model(name, hf_dir)
    # A fresh model per prompt: HF's dynamic RoPE keeps state across calls (its frequencies only
    # reset below max_position_embeddings), so one shared instance would be order-dependent.
    auto = transformers.AutoModelForCausalLM
    expected = [_hf_greedy(auto.from_pretrained(hf_dir, dtype=torch.float32).eval(), p)
                for p in PROMPTS]
    return name, hf_dir, expected


def _check_logits(llm: LLM, expected) -> None:
    for prompt, (_, hf_logits) in zip(PROMPTS, expected):
        logits = llm.prompt_logits(prompt)  # [len(prompt), V], through the verify program
        assert logits.shape == (len(prompt), hf_logits.shape[0])
        np.testing.assert_allclose(logits[-1], hf_logits, atol=LOGIT_ATOL, rtol=0)
    assert llm.pages_used() == 0


def test_hf_dir_logits_and_greedy_tokens(case):
    name, hf_dir, expected = case
    llm = _llm(hf_dir)
    _check_logits(llm, expected)
    # Each prompt alone, then all together in one batch of different lengths.
    for prompt, (tokens, _) in zip(PROMPTS, expected):
        assert _greedy(llm, [prompt]) == [tokens], name
    assert _greedy(llm, PROMPTS) == [t for t, _ in expected]
    assert llm.pages_used() == 0
    llm.core.scheduler.kv.check()


def test_converted_dir_greedy_tokens(case, tmp_path):
    name, hf_dir, expected = case
    out = tmp_path / "converted"
    assert convert.main(["--hf-dir", str(hf_dir), "--out", str(out), "--dtype", "float32"]) == 0
    llm = _llm(out)
    _check_logits(llm, expected)
    assert _greedy(llm, PROMPTS) == [t for t, _ in expected]


# Speculation must not change greedy output on any architecture: verify steps feed 1 + k
# tokens at once across RoPE scalings (dynamic RoPE depends on the length), a sliding window
# and qkv biases. One proposer per case keeps the suite short.
SPECULATIVE = {
    "llama_dynamic_rope": '{"method": "layer_skip", "num_speculative_tokens": 3, "num_layers": 1}',
    "mistral_sliding_window": '{"method": "layer_skip", "num_speculative_tokens": 5, '
                              '"num_layers": 1}',
    "qwen2_bias": '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}',
}


def test_speculative_greedy_tokens_equal_transformers(case):
    name, hf_dir, expected = case
    if name not in SPECULATIVE:
        pytest.skip("speculation is checked on one case per architecture feature")
    llm = _llm(hf_dir, SPECULATIVE[name])
    assert _greedy(llm, PROMPTS) == [t for t, _ in expected], name
    assert llm.core.spec_counts["num_draft_tokens"] > 0
    assert llm.pages_used() == 0
