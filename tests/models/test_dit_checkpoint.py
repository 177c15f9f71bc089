"""Streamed safetensors writing and saving a DiT as a ComfyUI single file."""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsumugi.models.configs import config_to_metadata
from tsumugi.models.detect import EDIT_2511_MARKER, detect
from tsumugi.models.dit_checkpoint import comfy_lazy_tensors, save_dit_checkpoint
from tsumugi.models.loader import load_dit, load_info
from tsumugi.models.safetensors_write import LazyTensor, save_file_atomic, save_file_streamed
from tsumugi.testing.tiny_models import comfy_state_dict, model_config

ARCH = {"qwen_image_dit": "qwen_image", "zimage_dit": "zimage"}


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "w.bf16": rnd(4, 3).bfloat16(),
        "b.fp16": rnd(5).half(),
        "a.fp32": rnd(2, 2, 2),
        "z.e4m3": rnd(3, 4).to(torch.float8_e4m3fn),
        "y.e5m2": rnd(7).to(torch.float8_e5m2),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(1.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "ü.nonascii": torch.ones(3, dtype=torch.uint8),
    }


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _leftovers(directory: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("metadata", [None, {}, {"note": "a\nb \x01 ü/\"q\""}])
def test_streamed_writer_is_byte_identical_to_save_file(tmp_path, metadata):
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata=metadata)
    save_file_streamed(tensors, tmp_path / "ours.safetensors", metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    got, meta = _read(tmp_path / "ours.safetensors")
    assert meta == (metadata or {})
    assert got.keys() == tensors.keys()
    assert all(_same_bytes(got[k], v) for k, v in tensors.items())


def test_streamed_writer_with_several_metadata_entries(tmp_path):
    # The library takes metadata from a hash map (order varies between runs): same header up to that
    # order, same data bytes.
    metadata = {"z": "1", "a": "2", "tsumugi.config": json.dumps({"x": [1, 2]})}
    save_file(_mixed(), str(tmp_path / "lib.safetensors"), metadata=metadata)
    lazy = {k: LazyTensor(v.dtype, tuple(v.shape), lambda v=v: v.clone()) for k, v in _mixed().items()}
    save_file_streamed(lazy, tmp_path / "ours.safetensors", metadata)
    lib, ours = (tmp_path / "lib.safetensors").read_bytes(), (tmp_path / "ours.safetensors").read_bytes()
    assert len(lib) == len(ours) and lib[:8] == ours[:8]
    assert _split(lib) == _split(ours)
    assert list(_split(lib)[0]) == list(_split(ours)[0])  # same tensor order
    assert _read(tmp_path / "ours.safetensors")[1] == metadata


def test_producers_run_one_at_a_time_in_file_order(tmp_path):
    source = _mixed()
    alive: list[weakref.ref] = []
    calls: list[str] = []

    def producer(key: str):
        def produce() -> torch.Tensor:
            assert all(ref() is None for ref in alive), "an earlier produced tensor is still alive"
            calls.append(key)
            tensor = source[key].clone()
            alive.append(weakref.ref(tensor))
            return tensor

        return produce

    lazy = {k: LazyTensor(v.dtype, tuple(v.shape), producer(k)) for k, v in source.items()}
    path = save_file_streamed(lazy, tmp_path / "x.safetensors", {"k": "v"})
    header, _ = _split(path.read_bytes())
    assert calls == [k for k in header if k != "__metadata__"]
    got, _ = _read(path)
    assert all(_same_bytes(got[k], v) for k, v in source.items())


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float16)], ids=["shape", "dtype"]
)
def test_wrong_producer_output_names_key_and_leaves_nothing(tmp_path, bad):
    lazy = {
        "good": LazyTensor(torch.float32, (4,), lambda: torch.zeros(4)),
        "blocks.0.bad": LazyTensor(torch.float32, (2, 3), lambda: bad),
    }
    with pytest.raises(ValueError, match=r"'blocks\.0\.bad'"):
        save_file_streamed(lazy, tmp_path / "out.safetensors")
    assert _leftovers(tmp_path) == []


def test_failure_keeps_existing_destination(tmp_path):
    path = save_file_atomic({"old": torch.ones(2)}, tmp_path / "out.safetensors")
    before = path.read_bytes()

    def boom() -> torch.Tensor:
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        save_file_streamed({"a": torch.ones(3), "b": LazyTensor(torch.float32, (1,), boom)}, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []


def test_meta_tensor_and_bad_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'m'.*meta"):
        save_file_streamed({"m": torch.empty(2, device="meta")}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        save_file_streamed({"a": torch.ones(1)}, tmp_path / "a.safetensors", {"n": 1})  # type: ignore[dict-item]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("save_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["qwen_image_dit", "zimage_dit"])
def test_save_dit_checkpoint_round_trip(kind, save_dtype, tiny_file, tmp_path, caplog):
    # A DiT loaded from a diffusers folder, in fp32: the file must come out in the ComfyUI layout.
    model = load_dit(tiny_file(kind, "diffusers"), ARCH[kind], dtype=torch.float32)
    out = tmp_path / "dit.safetensors"
    with caplog.at_level(logging.DEBUG, logger="tsumugi.models.dit_checkpoint"):
        assert save_dit_checkpoint(model, out, dtype=save_dtype, metadata={"ss_note": "hi"}) == out
    assert "one group" not in caplog.text  # converted block by block

    det = detect(out, "dit")
    with det.source:
        assert (det.kind, det.layout, det.prefix) == (kind, "comfy", "")
    tensors, meta = _read(out)
    want = comfy_state_dict(model, kind)
    assert list(tensors) and tensors.keys() == want.keys()
    for key, ref in want.items():
        assert tensors[key].dtype == save_dtype and torch.equal(tensors[key], ref.to(save_dtype)), key
    assert meta["ss_note"] == "hi"
    assert json.loads(meta[f"tsumugi.config.{kind}"]) == json.loads(
        config_to_metadata(model_config(model))["tsumugi.config"]
    )
    back = load_dit(out, ARCH[kind], dtype=save_dtype)
    assert load_info(back)["layout"] == "comfy" and not load_info(back)["edit_2511_marker"]
    reference = model.state_dict()
    for key, got in back.state_dict().items():
        assert got.dtype == save_dtype and torch.equal(got, reference[key].to(save_dtype)), key


def test_save_dit_checkpoint_keeps_edit_2511_marker(tiny, tmp_path):
    sd = comfy_state_dict(tiny("qwen_image_dit"), "qwen_image_dit")
    sd[EDIT_2511_MARKER] = torch.empty(0)
    meta = config_to_metadata(model_config(tiny("qwen_image_dit")), "qwen_image_dit")
    source = save_file_atomic(sd, tmp_path / "edit_2511.safetensors", meta)
    model = load_dit(source, "qwen_image", dtype=torch.float32)
    out = save_dit_checkpoint(model, tmp_path / "out.safetensors", dtype=torch.bfloat16)
    tensors, _ = _read(out)
    assert tensors.keys() == sd.keys() and tensors[EDIT_2511_MARKER].numel() == 0
    back = load_dit(out, "qwen_image", dtype=torch.bfloat16)
    assert load_info(back)["edit_2511_marker"] and back.config.zero_cond_t


def test_save_dit_checkpoint_extra_tensors(tiny, tmp_path):
    model = tiny("zimage_dit")  # built directly, not by the loader: kind and config from the model
    norm = torch.ones(model.config.dim)
    out = save_dit_checkpoint(model, tmp_path / "z.safetensors", dtype=None, extra={"norm_final.weight": norm})
    tensors, _ = _read(out)
    assert torch.equal(tensors["norm_final.weight"], norm)
    assert tensors.keys() == {*comfy_state_dict(model, "zimage_dit"), "norm_final.weight"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    with pytest.raises(ValueError, match="x_pad_token"):
        save_dit_checkpoint(model, tmp_path / "bad.safetensors", dtype=None, extra={"x_pad_token": norm})
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("kind", ["qwen_image_dit", "zimage_dit"])
def test_dit_tensors_are_produced_one_at_a_time(kind, tiny, tmp_path):
    model = tiny(kind)
    alive: list[weakref.ref] = []
    lazy = comfy_lazy_tensors(model, dtype=torch.bfloat16)

    def tracked(entry: LazyTensor) -> LazyTensor:
        def produce() -> torch.Tensor:
            assert all(ref() is None for ref in alive), "an earlier produced tensor is still alive"
            tensor = entry.produce()
            alive.append(weakref.ref(tensor))
            return tensor

        return LazyTensor(entry.dtype, entry.shape, produce)

    path = save_file_streamed({k: tracked(v) for k, v in lazy.items()}, tmp_path / "x.safetensors")
    assert len(alive) == len(lazy)
    tensors, _ = _read(path)
    want = comfy_state_dict(model, kind)
    assert all(torch.equal(tensors[k], v.bfloat16()) for k, v in want.items())
