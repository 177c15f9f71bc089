"""Safetensors reading (headers, shards, index files, lazy casts) and atomic writing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tsumugi.errors import UserError
from tsumugi.models.safetensors_io import open_safetensors, read_header
from tsumugi.models.safetensors_write import save_file_atomic, write_text_atomic


def _tensors():
    return {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b.bias": torch.ones(4, dtype=torch.bfloat16),
        "c.index": torch.tensor([1, 2, 3], dtype=torch.int64),
    }


def test_header_without_data(tmp_path):
    path = save_file_atomic(_tensors(), tmp_path / "x.safetensors", {"k": "v"})
    infos, metadata = read_header(path)
    assert metadata == {"k": "v"}
    assert infos["a.weight"].shape == (2, 3) and infos["a.weight"].dtype == torch.float32
    assert infos["b.bias"].dtype == torch.bfloat16


def test_get_casts_floats_only(tmp_path):
    path = save_file_atomic(_tensors(), tmp_path / "x.safetensors")
    with open_safetensors(path) as src:
        assert src.get("a.weight", torch.float16).dtype == torch.float16
        assert torch.equal(src.get("a.weight"), _tensors()["a.weight"])
        assert src.get("c.index", torch.float16).dtype == torch.int64
        meta = src.meta_tensors()
        assert meta["a.weight"].is_meta and meta["a.weight"].shape == (2, 3)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "x.safetensors"
    save_file_atomic({"t": torch.zeros(2)}, target)
    save_file_atomic({"t": torch.ones(2)}, target)
    with open_safetensors(target) as src:
        assert torch.equal(src.get("t"), torch.ones(2))
    assert [p.name for p in target.parent.iterdir()] == ["x.safetensors"]
    write_text_atomic(tmp_path / "c.json", "{}")
    assert (tmp_path / "c.json").read_text() == "{}"


def test_atomic_write_handles_shared_and_noncontiguous(tmp_path):
    base = torch.randn(3, 4)
    path = save_file_atomic({"w": base, "tied": base, "t": base.t()}, tmp_path / "x.safetensors")
    with open_safetensors(path) as src:
        assert torch.equal(src.get("tied"), base) and torch.equal(src.get("t"), base.t())


def test_failed_write_keeps_old_file(tmp_path):
    target = save_file_atomic({"t": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises((AttributeError, TypeError)):
        save_file_atomic({"t": object()}, target)  # type: ignore[dict-item]
    with open_safetensors(target) as src:
        assert torch.equal(src.get("t"), torch.zeros(2))
    assert len(list(tmp_path.iterdir())) == 1


def _write_shards(tmp_path, n=3):
    names = [f"m-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for i, name in enumerate(names):
        save_file({f"k{i}": torch.full((2,), float(i))}, str(tmp_path / name))
    return [tmp_path / name for name in names]


def test_shard_set_from_any_shard(tmp_path):
    files = _write_shards(tmp_path)
    for given in (files[0], files[1]):
        with open_safetensors(given) as src:
            assert src.files == files
            assert sorted(src.keys()) == ["k0", "k1", "k2"]
            assert torch.equal(src.get("k2"), torch.full((2,), 2.0))


def test_missing_shard_is_named(tmp_path):
    files = _write_shards(tmp_path)
    files[1].unlink()
    with pytest.raises(UserError, match="m-00002-of-00003.safetensors is missing"):
        open_safetensors(files[0])


def test_index_json(tmp_path):
    files = _write_shards(tmp_path, 2)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"k0": files[0].name, "k1": files[1].name}}))
    with open_safetensors(index) as src:
        assert sorted(src.keys()) == ["k0", "k1"]
    index.write_text(json.dumps({"weight_map": {"k0": "absent.safetensors"}}))
    with pytest.raises(UserError, match="absent.safetensors"):
        open_safetensors(index)


def test_duplicate_key_across_shards(tmp_path):
    for i in (1, 2):
        save_file({"same": torch.zeros(1)}, str(tmp_path / f"d-{i:05d}-of-00002.safetensors"))
    with pytest.raises(UserError, match="stored twice"):
        open_safetensors(tmp_path / "d-00001-of-00002.safetensors")


@pytest.mark.parametrize("cut", [4, 40, -10])
def test_truncated_file_names_the_file(tmp_path, cut):
    path = save_file_atomic({"t": torch.randn(64)}, tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(UserError, match="cut.safetensors.*truncated"):
        open_safetensors(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"not json at all!!!!!" + b"\0" * 10)
    with pytest.raises(UserError, match="junk.safetensors.*corrupt"):
        open_safetensors(path)
