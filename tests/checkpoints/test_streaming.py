"""The per-shard and streaming pieces of loading (docs/loading.md): `read_region` equals the
whole-tensor transform sliced, for every parameter of a model with biases; `StreamWriter`
assembles tensors from arbitrary rectangular pieces; a pp x tp mesh (KV heads replicated,
one layer per stage) loads the same values as the host reference; conversion in small pieces
equals conversion whole."""

from __future__ import annotations

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest

import checkpoints
from checkpoints import convert as convert_mod
from checkpoints import load as load_mod
from checkpoints import llama
from checkpoints.safetensors_io import open_weights
from checkpoints.safetensors_write import StreamWriter
from jaxinfer.model_loader import param_shardings
from sharding import make_mesh

pytest.importorskip("transformers")


def _slices(shape, rng):
    out = []
    for n in shape:
        a = int(rng.integers(0, n))
        out.append(slice(a, int(rng.integers(a + 1, n + 1))))
    return tuple(out)


def test_read_region_equals_the_transform_sliced(hf_model):
    path = hf_model("qwen2").path
    reader = open_weights(path)
    cfg = checkpoints.model_config_from_hf(path)
    rng = np.random.default_rng(0)
    for m in llama.tensor_map(cfg):
        name = m.hf_names()[-1]
        full = m.transform(reader.read(name))
        assert full.shape == m.shape
        for _ in range(6):
            index = _slices(m.shape, rng)
            np.testing.assert_array_equal(llama.read_region(reader, name, m, index),
                                          full[index], err_msg=f"{name} {index}")


def test_stream_writer_assembles_pieces(tmp_path):
    rng = np.random.default_rng(1)
    want = {"a": rng.standard_normal((6, 5, 4)).astype(np.float32),
            "b": rng.standard_normal((7, 3)).astype(ml_dtypes.bfloat16),
            "c": np.arange(5, dtype=np.int8), "s": np.array(3.0, np.float32)}
    w = StreamWriter(tmp_path, [(k, v.dtype, v.shape) for k, v in want.items()],
                     max_file_bytes=300)  # several files, one tensor alone in its own
    # "a" in pieces cut along every axis; "b" in column strips; "c" and "s" whole.
    for i, j in itertools.product(range(0, 6, 4), range(0, 5, 2)):
        index = (slice(i, i + 4), slice(j, j + 2), slice(1, 4))
        w.write("a", index, want["a"][index])
        w.write("a", index[:2] + (slice(0, 1),), want["a"][index[:2] + (slice(0, 1),)])
    for j in range(3):
        w.write("b", (slice(None), slice(j, j + 1)), want["b"][:, j:j + 1])
    w.write("c", (slice(None),), want["c"])
    w.write("s", (), want["s"])
    w.close()
    reader = open_weights(tmp_path)
    assert len(set(w.weight_map.values())) > 1
    for k, v in want.items():
        np.testing.assert_array_equal(reader.read(k), v)
    with pytest.raises(Exception, match="does not fit"):
        StreamWriter(tmp_path / "x", [("a", np.float32, (2,))]).write(
            "a", (slice(1, 3),), np.zeros(2, np.float32))


@pytest.mark.parametrize("mesh_spec, path", [("pp=2,tp=4", "host"), ("tp=2", "device")])
def test_mesh_loads_per_shard(hf_model, monkeypatch, mesh_spec, path):
    """pp=2,tp=4: 2 KV heads < tp, replicated; one layer per stage; small shards assembled on
    the host. tp=2 with every shard assembled on the device in 256-byte pieces (the path big
    models take): pieces cut inside layers, transposed and cast (float32 -> bfloat16) on the
    device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest)")
    if path == "device":
        monkeypatch.setattr(load_mod, "_SMALL_SHARD", 0)
        monkeypatch.setattr(load_mod, "_piece_limit", lambda shard_bytes: 256)
    hf = hf_model("qwen2").path
    cfg = checkpoints.model_config_from_hf(hf)
    _, shardings = param_shardings(cfg, make_mesh(mesh_spec), np.float32)
    dtype = "float32" if path == "host" else "bfloat16"  # the device path casts there
    params = checkpoints.load_params(hf, cfg, dtype=dtype, shardings=shardings)
    host = llama.hf_params_dict(open_weights(hf), cfg, dtype=dtype)
    flat = jax.tree.leaves_with_path(params)
    assert len(flat) == len(jax.tree.leaves(host))
    for (key, x), want in zip(flat, jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(x), want, err_msg=str(key))
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    wq = {s.data.shape for s in params["layers"]["wq"].addressable_shards}
    assert wq == ({(1, 64, 1, 16)} if mesh_spec == "pp=2,tp=4" else {(2, 64, 2, 16)})


def test_conversion_in_small_pieces_equals_whole(hf_model, tmp_path, monkeypatch):
    path = hf_model("llama").path
    convert_mod.convert(path, tmp_path / "whole", dtype="float32", show_progress=False)
    # 512-byte pieces: every projection is written in many row ranges, transposed ones as
    # strided runs.
    monkeypatch.setattr(convert_mod, "chunk_bytes_for", lambda table, itemsize: 512)
    convert_mod.convert(path, tmp_path / "pieces", dtype="float32", show_progress=False)
    a, b = open_weights(tmp_path / "whole" / "params"), open_weights(tmp_path / "pieces" / "params")
    assert a.names() == b.names() and "layers/w_down/1" in a.names()
    for name in a.names():
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
