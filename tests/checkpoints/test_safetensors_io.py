"""Weight files: header parsing, dtypes (BF16 via ml_dtypes), truncation, sharding, pickle."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from checkpoints.safetensors_io import open_weights, read_header
from jaxinfer.errors import CheckpointError

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(4, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "d.i64": torch.arange(6),  # unsupported dtype: allowed in the file, refused on read
    }


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_dtypes_round_trip(tmp_path):
    tensors = _tensors()
    st_torch.save_file(tensors, tmp_path / "model.safetensors")
    reader = open_weights(tmp_path)
    assert reader.names() == frozenset(tensors)
    for name in ("a.f32", "b.f16", "c.bf16"):
        got = reader.read(name)
        want = _as_numpy(tensors[name])
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bit-exact
    assert reader.read("c.bf16").dtype == np.dtype(ml_dtypes.bfloat16)
    assert reader.info("c.bf16").dtype == "BF16" and reader.info("c.bf16").shape == (2, 3, 4)
    with pytest.raises(CheckpointError, match=r"'d.i64' has dtype I64, which is not supported"):
        reader.read("d.i64")
    with pytest.raises(CheckpointError, match="'nope' not found"):
        reader.read("nope")


@pytest.mark.parametrize("cut", [1, 100, 300])
def test_truncated_file(tmp_path, cut):
    st_torch.save_file(_tensors(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    os.truncate(path, path.stat().st_size - cut)
    with pytest.raises(CheckpointError) as e:
        open_weights(tmp_path)
    assert "model.safetensors" in str(e.value) and "truncated" in str(e.value)


def test_truncated_header_and_tiny_file(tmp_path):
    path = tmp_path / "model.safetensors"
    st_torch.save_file(_tensors(), path)
    os.truncate(path, 40)
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)
    os.truncate(path, 3)
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match="corrupt header.*'x'"):
        read_header(path)
    path.write_bytes((5).to_bytes(8, "little") + b"{oops" + bytes(4))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(path)


def test_sharded_index_and_glob(tmp_path):
    t = _tensors()
    st_torch.save_file({"a.f32": t["a.f32"]}, tmp_path / "model-00001-of-00002.safetensors")
    st_torch.save_file({"b.f16": t["b.f16"]}, tmp_path / "model-00002-of-00002.safetensors")
    # No index: every *.safetensors file is read.
    assert open_weights(tmp_path).names() == {"a.f32", "b.f16"}
    index = {"metadata": {}, "weight_map": {"a.f32": "model-00001-of-00002.safetensors",
                                            "b.f16": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reader = open_weights(tmp_path)
    np.testing.assert_array_equal(reader.read("b.f16"), t["b.f16"].numpy())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        open_weights(tmp_path)


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    st_torch.save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'b' is not in shard s1.safetensors"):
        open_weights(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        open_weights(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        open_weights(tmp_path / "missing")


def test_pickle_refused_then_allowed(tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        open_weights(tmp_path)
    assert str(e.value) == (f"{tmp_path}: pickle weights (pytorch_model.bin) can run arbitrary "
                            "code; pass --allow-pickle to load them")
    reader = open_weights(tmp_path, allow_pickle=True)
    assert reader.names() == frozenset(tensors)
    for name in ("a.f32", "b.f16", "c.bf16"):
        got, want = reader.read(name), _as_numpy(tensors[name])
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert reader.info("c.bf16").shape == (2, 3, 4)
    with pytest.raises(CheckpointError, match="I64"):
        reader.read("d.i64")


def test_pickle_sharded_index(tmp_path):
    t = _tensors()
    torch.save({"a.f32": t["a.f32"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.f16": t["b.f16"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"a.f32": "pytorch_model-00001-of-00002.bin",
                            "b.f16": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"pickle weights \(pytorch_model-00001"):
        open_weights(tmp_path)
    assert open_weights(tmp_path, allow_pickle=True).names() == {"a.f32", "b.f16"}


def test_pickle_that_is_not_a_state_dict(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(CheckpointError, match="cannot read pickle weights"):
        open_weights(tmp_path, allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    st_torch.save_file({"s": torch.zeros(1)}, tmp_path / "model.safetensors")
    torch.save({"p": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert open_weights(tmp_path).names() == {"s"}
