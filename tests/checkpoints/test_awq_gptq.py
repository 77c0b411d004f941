"""AWQ and GPTQ int4 checkpoints (`checkpoints/awq_gptq.py`), built here.

A tiny random Llama is saved by transformers (float), then its projections are replaced by
known int4 codes, zero points and scales, packed the way AutoAWQ (`WQLinear_GEMM.from_linear`:
8 columns per int32 word in the order 0, 2, 4, 6, 1, 3, 5, 7) and AutoGPTQ
(`QuantLinear.pack` of qlinear_cuda_old: 8 rows per word, zeros stored minus one, `g_idx`;
act-order: `g_idx[perm[i]] = i // group` for a random row permutation `perm`) do; the packing
below is written from those descriptions, independently of the loader. The same dequantized
weights, `(q - zero) * scale` per row's group, are saved as a float checkpoint: the reference.
The int4 checkpoint must load as int4-g128 QuantArrays and give the reference's logits (float32,
teacher forced through the engine) at tp=1, and at tp=2 on two fake CPU devices for act-order
(o_proj's and down_proj's rows split over tp with no gather: see the loader's docstring).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer import ops
from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model_loader import load_model
from jaxinfer.quant import QuantArray
from sharding import spmd
from sharding.mesh import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

GROUP = 128
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROMPT = [5, 17, 99, 3, 120, 42, 7, 11, 100, 3, 64, 1]


def _pack_awq(int_cols: np.ndarray) -> np.ndarray:
    """AutoAWQ: [R, N] -> [R, N/8] int32; word c, bit slot i <- column 8c + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((int_cols.shape[0], int_cols.shape[1] // 8), np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= int_cols[:, col * 8 + order[i]].astype(np.uint32) << (4 * i)
    return out.view(np.int32)


def _pack_gptq_rows(int_rows: np.ndarray) -> np.ndarray:
    """AutoGPTQ qweight: [K, N] -> [K/8, N] int32; word row i, slot j <- row 8i + j."""
    out = np.zeros((int_rows.shape[0] // 8, int_rows.shape[1]), np.uint32)
    for row in range(out.shape[0]):
        for j in range(8):
            out[row] |= int_rows[8 * row + j].astype(np.uint32) << (4 * j)
    return out.view(np.int32)


def _pack_gptq_cols(int_cols: np.ndarray) -> np.ndarray:
    """AutoGPTQ qzeros: [G, N] -> [G, N/8] int32; word col c, slot j <- column 8c + j."""
    out = np.zeros((int_cols.shape[0], int_cols.shape[1] // 8), np.uint32)
    for col in range(out.shape[1]):
        for j in range(8):
            out[:, col] |= int_cols[:, 8 * col + j].astype(np.uint32) << (4 * j)
    return out.view(np.int32)


def _build(root: Path, method: str, act_order: bool) -> tuple[Path, Path]:
    """(int4 checkpoint dir, float reference dir) of one random model."""
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    tag = f"{method}{'_act_order' if act_order else ''}"
    ref_dir, q_dir = root / f"{tag}_ref", root / tag
    model.save_pretrained(ref_dir, safe_serialization=True)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    ref, packed = dict(state), {k: v for k, v in state.items()
                                if not any(p + ".weight" in k for p in PROJ)}
    for i in range(cfg.num_hidden_layers):
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}"
            n, k = state[name + ".weight"].shape  # HF Linear: [out, in]
            g = k // GROUP
            codes = rng.integers(0, 16, (k, n))
            zeros = rng.integers(1, 16, (g, n))  # >= 1: GPTQ v1 stores zero - 1
            scales = (rng.random((g, n)) * 0.01 + 0.002).astype(np.float16)
            g_idx = np.arange(k) // GROUP
            if act_order:
                perm = rng.permutation(k)
                g_idx = np.empty(k, np.int64)
                g_idx[perm] = np.arange(k) // GROUP
            w = (codes - zeros[g_idx]) * scales.astype(np.float32)[g_idx]  # [K, N]
            ref[name + ".weight"] = np.ascontiguousarray(w.T, np.float32)  # save_file: C order
            packed[name + ".scales"] = scales
            if method == "awq":
                packed[name + ".qweight"] = _pack_awq(codes)
                packed[name + ".qzeros"] = _pack_awq(zeros)
            else:
                packed[name + ".qweight"] = _pack_gptq_rows(codes)
                packed[name + ".qzeros"] = _pack_gptq_cols(zeros - 1)
                packed[name + ".g_idx"] = g_idx.astype(np.int32)
    for f in ref_dir.glob("*.safetensors"):
        f.unlink()
    safetensors_numpy.save_file(ref, str(ref_dir / "model.safetensors"))
    q_dir.mkdir()
    safetensors_numpy.save_file(packed, str(q_dir / "model.safetensors"))
    config = json.loads((ref_dir / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
         "version": "gemm"} if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order,
         "sym": False, "checkpoint_format": "gptq"})
    (q_dir / "config.json").write_text(json.dumps(config))
    return q_dir, ref_dir


def _engine() -> EngineConfig:
    return EngineConfig(page_size=8, num_pages=8, max_seq_len=32, dtype="float32",
                        prefill_buckets=(16,), prefill_rows=(1,), batch_buckets=(1,))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4_ckpt")
    return {key: _build(root, *key) for key in (("awq", False), ("gptq", False),
                                                ("gptq", True))}


@pytest.mark.parametrize("method,act_order,tp", [("awq", False, 1), ("gptq", False, 1),
                                                 ("gptq", True, 1), ("gptq", True, 2)])
def test_loads_and_matches_the_dequantized_reference(built, method, act_order, tp):
    q_dir, ref_dir = built[(method, act_order)]
    mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
    loaded = load_model(str(q_dir), mesh=mesh, dtype="float32")
    assert loaded.quant == "int4-g128"
    layers = loaded.params["layers"]
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        qa = layers[name]
        assert isinstance(qa, QuantArray) and qa.kind == "int4" and qa.group == GROUP, name
        # act-order: down_proj's rows were sorted into contiguous groups (the kernel runs it);
        # the others keep their per-row groups.
        assert (qa.g_idx is not None) == (act_order and name != "w_down"), name
    assert not isinstance(loaded.params["lm_head"], QuantArray)
    if act_order and tp == 1:  # the folded down_proj runs the Pallas kernel (interpret)
        x = jax.random.normal(jax.random.key(0), (3, 512), np.float32)
        got_k = ops.linear(x, layers["w_down"], layer=1, kernels="pallas")
        want_k = ops.linear(x, layers["w_down"], layer=1, kernels="reference")
        np.testing.assert_allclose(np.asarray(got_k), np.asarray(want_k), rtol=2e-5,
                                   atol=2e-5 * float(np.sqrt(np.mean(np.asarray(want_k) ** 2))))
    if tp == 2:  # rows of the row-parallel weights split over tp, their groups with them
        assert "tp" in layers["w_down"].q.sharding.spec  # [L, D, F/2]: F on tp
        assert "tp" in layers["w_down"].scale.sharding.spec
        assert "tp" in layers["wo"].g_idx.sharding.spec
        assert "tp" not in layers["wo"].scale.sharding.spec  # scattered groups: replicated
        _assert_no_gather(mesh, layers)
    got = LLM.from_loaded(loaded, _engine(), mesh=mesh).prompt_logits(PROMPT)
    ref_mesh = make_mesh("tp=1", devices=jax.devices()[:1])
    ref = LLM.from_loaded(load_model(str(ref_dir), mesh=ref_mesh, dtype="float32"), _engine(),
                          mesh=ref_mesh).prompt_logits(PROMPT)
    scale = float(np.sqrt(np.mean(ref ** 2)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _assert_no_gather(mesh, layers) -> None:
    """The row-parallel projections on their tp-split inputs compile to local work and one
    all-reduce of the partial sums: nothing else moves (no all-gather, all-to-all or permute of
    the activations or the weights)."""
    sds = jax.ShapeDtypeStruct
    spec = jax.sharding.PartitionSpec
    cases = {"wo": ((1, 16, 4, 64), spec(None, None, "tp", None), 2),  # [B, T, N, H]
             "w_down": ((1, 16, 512), spec(None, None, "tp"), 1)}  # [B, T, F]
    for name, (shape, x_spec, contract) in cases.items():
        x = sds(shape, np.float32, sharding=jax.sharding.NamedSharding(mesh, x_spec))
        with spmd.mesh_context(mesh):
            hlo = jax.jit(lambda x, w, c=contract: ops.linear(
                x, w, contract=c, layer=0, kernels="reference")).lower(
                x, layers[name]).compile().as_text()
        for moved in ("all-gather", "all-to-all", "collective-permute"):  # (x split on
            assert moved not in hlo, (name, moved)  # head_dim instead gives an all-to-all)
        assert "all-reduce" in hlo, name


def test_unsupported_configs_are_one_line_errors(built, tmp_path):
    q_dir, _ = built[("awq", False)]
    mesh = make_mesh("tp=1", devices=jax.devices()[:1])
    for change, message in ((dict(bits=8), "only 4-bit"), (dict(group_size=64), "group_size 64"),
                            (dict(version="gemv"), "GEMM layout"),
                            (dict(quant_method="bnb"), "not supported")):
        bad = tmp_path / f"bad_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(q_dir, bad)
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"].update(change)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises((CheckpointError, ConfigError), match=message):
            load_model(str(bad), mesh=mesh, dtype="float32")


def test_float_checkpoint_quantized_at_load_under_tp(built):
    """--quant int4-g128 of a float checkpoint: the same logits at tp=2 as at tp=1 (groups
    split over tp with their rows)."""
    _, ref_dir = built[("awq", False)]
    logits = []
    for tp in (1, 2):
        mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
        loaded = load_model(str(ref_dir), mesh=mesh, dtype="float32", quant="int4-g128")
        assert loaded.quant == "int4-g128" and loaded.params["layers"]["wo"].g_idx is None
        logits.append(LLM.from_loaded(loaded, _engine(), mesh=mesh).prompt_logits(PROMPT))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4,
                               atol=1e-4 * float(np.sqrt(np.mean(logits[0] ** 2))))
