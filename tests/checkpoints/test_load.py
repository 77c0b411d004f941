"""load_model_config / load_params for HF and converted dirs, on 1 device and a tp=2 mesh."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoints
from checkpoints import llama as ckpt_llama
from checkpoints.convert import convert
from checkpoints.orbax_io import save_params
from checkpoints.safetensors_io import open_weights
from jaxinfer.config import ModelConfig, replace
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.models import llama as model_llama
from sharding import make_mesh, tree_shardings

pytest.importorskip("transformers")


def _shardings(cfg, spec="dp=1", devices=None):
    mesh = make_mesh(spec, devices=devices)
    return tree_shardings(mesh, model_llama.param_axes(model_llama.abstract_model(cfg)))


def _one_device(cfg):
    return _shardings(cfg, devices=jax.devices()[:1])


def _host_params(path, dtype):
    cfg = checkpoints.model_config_from_hf(path)
    return ckpt_llama.hf_params_dict(open_weights(path), cfg, dtype=dtype)


def _assert_same(loaded, host):
    assert jax.tree.structure(loaded) == jax.tree.structure(host)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, host)


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """name, dtype -> a converted directory (made once per module)."""
    cache = {}

    def get(name: str, dtype: str = "float32"):
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp("converted") / f"{name}-{dtype}"
            convert(hf_model(name).path, out, dtype=dtype, show_progress=False)
            cache[name, dtype] = out
        return cache[name, dtype]

    return get


def test_load_model_config_dispatch(hf_model, converted, tmp_path):
    hf = hf_model("qwen2").path
    cfg = checkpoints.load_model_config(hf)
    assert cfg == checkpoints.model_config_from_hf(hf)
    conv = converted("qwen2")
    assert (conv / "jaxinfer_config.json").is_file()
    assert checkpoints.load_model_config(conv) == cfg
    # The converted config is what counts, even if the copied config.json says otherwise.
    data = json.loads((conv / "jaxinfer_config.json").read_text())
    assert ModelConfig.from_json(data) == cfg
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_model_config(tmp_path)
    assert str(e.value) == (f"{tmp_path}: not a model directory (no jaxinfer_config.json or "
                            "config.json)")
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoints.load_model_config(tmp_path / "absent")


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_dir_one_device(hf_model, name, dtype):
    path = hf_model(name).path
    cfg = checkpoints.load_model_config(path)
    params = checkpoints.load_params(path, cfg, dtype=dtype, shardings=_one_device(cfg))
    _assert_same(params, _host_params(path, dtype))
    assert params["embed"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("name", ["llama_sharded", "mistral"])
def test_converted_equals_hf_dir(hf_model, converted, name):
    hf, conv = hf_model(name).path, converted(name)
    cfg = checkpoints.load_model_config(conv)
    shardings = _one_device(cfg)
    from_hf = checkpoints.load_params(hf, cfg, dtype="float32", shardings=shardings)
    from_conv = checkpoints.load_params(conv, cfg, dtype="float32", shardings=shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 from_hf, from_conv)
    info = json.loads((conv / "jaxinfer_checkpoint.json").read_text())
    assert (info["dtype"], info["quant"], info["format_version"], info["params_format"]) == (
        "float32", "none", 2, "safetensors")
    assert info["params"]["layers/wq"] == [2, 64, 4, 16]
    for name in ("config.json", "generation_config.json"):
        assert (conv / name).read_bytes() == (hf / name).read_bytes()


def test_converted_dtype_cast_on_restore(hf_model, converted):
    conv = converted("llama", "bfloat16")
    cfg = checkpoints.load_model_config(conv)
    as_f32 = checkpoints.load_params(conv, cfg, dtype="float32", shardings=_one_device(cfg))
    as_bf16 = checkpoints.load_params(conv, cfg, dtype="bfloat16", shardings=_one_device(cfg))
    assert as_f32["layers"]["wq"].dtype == np.float32
    assert as_bf16["layers"]["wq"].dtype == np.dtype("bfloat16")
    _assert_same(as_bf16, _host_params(hf_model("llama").path, "bfloat16"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b).astype(np.float32)), as_f32, as_bf16)


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_tp2_mesh_places_shards(hf_model, converted, source):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest)")
    path = hf_model("qwen2").path if source == "hf" else converted("qwen2")
    cfg = checkpoints.load_model_config(path)
    shardings = _shardings(cfg, "tp=2")
    params = checkpoints.load_params(path, cfg, dtype="float32", shardings=shardings)
    _assert_same(params, _host_params(hf_model("qwen2").path, "float32"))
    wq = params["layers"]["wq"]  # [L, D, N, H] split on heads
    assert wq.sharding == shardings["layers"]["wq"]
    assert len(wq.addressable_shards) == 2
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64, 2, 16)}
    assert {s.data.shape for s in params["layers"]["bk"].addressable_shards} == {(2, 1, 16)}
    assert {s.data.shape for s in params["embed"].addressable_shards} == {(64, 64)}
    full = np.asarray(wq)
    for shard in wq.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_shardings_must_match_config(hf_model):
    path = hf_model("llama").path
    cfg = checkpoints.load_model_config(path)
    tied = replace(cfg, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match=r"unexpected: \['lm_head'\]"):
        checkpoints.load_params(path, tied, dtype="float32", shardings=_one_device(cfg))


def test_converted_shape_mismatch_names_param(hf_model, converted, tmp_path):
    conv = converted("llama")
    cfg = checkpoints.load_model_config(conv)
    other = replace(cfg, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"'layers/w_gate' has shape \[2, 64, 128\], "
                                              r"expected \[2, 64, 96\]"):
        checkpoints.load_params(conv, other, dtype="float32", shardings=_one_device(other))


def test_save_params_round_trip_without_info(hf_model, tmp_path):
    """A bare orbax dir (no jaxinfer_checkpoint.json) restores in the requested dtype."""
    path = hf_model("llama_tied").path
    cfg = checkpoints.load_model_config(path)
    host = _host_params(path, "float32")
    save_params(tmp_path, host)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path, host)
    (tmp_path / "jaxinfer_config.json").write_text(json.dumps(cfg.to_json()))
    params = checkpoints.load_params(tmp_path, cfg, dtype="float32", shardings=_one_device(cfg))
    _assert_same(params, host)


def test_unfinished_conversion_is_reported(hf_model, tmp_path):
    cfg = checkpoints.load_model_config(hf_model("llama_tied").path)
    (tmp_path / "jaxinfer_config.json").write_text(json.dumps(cfg.to_json()))
    with pytest.raises(CheckpointError, match="no params/ directory"):
        checkpoints.load_params(tmp_path, cfg, dtype="float32", shardings=_one_device(cfg))


def test_pickle_dir_through_load_params(hf_model, tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    src = hf_model("llama_tied").path
    torch.save(st_torch.load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    cfg = checkpoints.load_model_config(tmp_path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        checkpoints.load_params(tmp_path, cfg, dtype="float32", shardings=_one_device(cfg))
    params = checkpoints.load_params(tmp_path, cfg, dtype="float32", shardings=_one_device(cfg),
                                     allow_pickle=True)
    _assert_same(params, _host_params(src, "float32"))


def _shared_model(name: str):
    repo = Path(__file__).resolve().parents[2]
    for root in (repo / "shared", repo.parent / "shared"):
        if (root / "models" / name).is_dir():
            return root / "models" / name
    pytest.skip("shared/models not present")


def test_shared_trained_model(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    hf = _shared_model("stories260K-hf")
    cfg = checkpoints.load_model_config(hf)
    params = checkpoints.load_params(hf, cfg, dtype="float32", shardings=_one_device(cfg))
    raw = safetensors_numpy.load_file(hf / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][2]),
                                  raw["model.layers.2.self_attn.q_proj.weight"].T.reshape(64, 8, 8))
    np.testing.assert_array_equal(np.asarray(params["embed"]), raw["model.embed_tokens.weight"])
    convert(hf, tmp_path / "out", dtype="float32", show_progress=False)
    _assert_same(checkpoints.load_params(tmp_path / "out", cfg, dtype="float32",
                                         shardings=_one_device(cfg)),
                 jax.tree.map(np.asarray, params))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (
        hf / "tokenizer.model").read_bytes()
