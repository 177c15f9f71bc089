"""Dataset config parsing and validation: every bad input is reported with its culprit named."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsumugi.data.config import DatasetConfig, load_dataset_config
from tsumugi.data.items import list_items
from tsumugi.errors import UserError


def _load(path: Path, architecture: str = "qi", args=None) -> list[DatasetConfig]:
    return load_dataset_config(path, args, architecture=architecture)


def _error(path: Path, architecture: str = "qi", args=None) -> str:
    with pytest.raises(UserError) as info:
        _load(path, architecture, args)
    return str(info.value)


def _lines(message: str) -> list[str]:
    return message.splitlines()[1:]


# ---------------------------------------------------------------------------------------------- basics


def test_directory_dataset(tmp_path, captioned, write_config):
    images = tmp_path / "imgs"
    captioned(images, ["b.png", "a.jpg", "c.webp"])
    (images / "a.txt").write_text("  a red cup \n", encoding="utf-8")
    cfg = write_config(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n\n'
        f'[[datasets]]\nimage_directory = "{images}"\n'
    )
    [ds] = _load(cfg)
    assert ds.resolution == (64, 64)
    assert ds.cache_directory == images
    assert (ds.batch_size, ds.num_repeats, ds.enable_bucket, ds.bucket_no_upscale) == (1, 1, False, False)
    items = list_items(ds)
    assert [i.image_path.name for i in items] == ["a.jpg", "b.png", "c.webp"]
    assert items[0].caption == "a red cup"
    assert items[0].original_size == (64, 48)
    assert items[0].cache_stem == "a"
    assert items[0].control_paths == () and items[0].extra_target_paths == ()


def test_json_config_and_width_first_resolution(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(
        json.dumps(
            {
                "general": {"resolution": [960, 544], "enable_bucket": True},
                "datasets": [{"image_directory": str(tmp_path / "imgs")}],
            }
        ),
        name="dataset.json",
    )
    [ds] = _load(cfg)
    assert ds.resolution == (960, 544) and ds.enable_bucket
    assert ds.caption_extension == ".txt"  # default for directory datasets


def test_default_resolution_and_caption_extension(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    [ds] = _load(write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'))
    assert ds.resolution == (960, 544) and ds.caption_extension == ".txt"
    assert len(list_items(ds)) == 1


def test_value_fallback_dataset_general_args_default(tmp_path, captioned, write_config):
    for name in ("one", "two"):
        captioned(tmp_path / name, ["a.png"])
    args = argparse.Namespace(batch_size=7, num_repeats=None, unrelated_flag=3)
    cfg = write_config(
        f'[general]\nbatch_size = 3\n\n[[datasets]]\nimage_directory = "{tmp_path / "one"}"\n'
        f'batch_size = 2\n\n[[datasets]]\nimage_directory = "{tmp_path / "two"}"\n'
    )
    one, two = _load(cfg, args=args)
    assert (one.batch_size, two.batch_size) == (2, 3)
    cfg = write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "one"}"\n', name="b.toml")
    [ds] = _load(cfg, args=args)
    assert ds.batch_size == 7 and ds.num_repeats == 1


def test_bad_command_line_value_is_named(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n')
    message = _error(cfg, args=argparse.Namespace(batch_size=0))
    assert "command-line argument --batch_size" in message and "positive integer" in message


def test_deprecated_keys_are_renamed_with_a_warning(
    tmp_path, captioned, make_image, write_config, data_warnings
):
    captioned(tmp_path / "imgs", ["a.png"])
    make_image(tmp_path / "ctrl" / "a.png")
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\ncontrol_directory = "{tmp_path / "ctrl"}"\n'
        "qwen_image_edit_no_resize_control = true\nqwen_image_edit_control_resolution = [1024, 768]\n"
        "flux_kontext_no_resize_control = false\n"
    )
    [ds] = _load(cfg, "qie")
    # renames run in Musubi's order (flux_kontext_* first); a later old key for a set new key is dropped
    assert ds.no_resize_control is False
    assert ds.control_resolution == (1024, 768)
    log = data_warnings()
    assert "datasets[0].flux_kontext_no_resize_control: deprecated key, read as 'no_resize_control'" in log
    assert "datasets[0].qwen_image_edit_no_resize_control: deprecated key ignored" in log
    assert (
        "datasets[0].qwen_image_edit_control_resolution: deprecated key, read as 'control_resolution'" in log
    )


def test_extension_and_syntax_errors_name_the_file(tmp_path, write_config):
    with pytest.raises(UserError, match=r"dataset\.yaml.*\.toml or \.json"):
        _load(write_config("a: 1", name="dataset.yaml"))
    with pytest.raises(UserError, match=r"broken\.toml.*not valid TOML"):
        _load(write_config("[general\nresolution = 1", name="broken.toml"))
    with pytest.raises(UserError, match=r"missing\.toml.*not found"):
        _load(tmp_path / "missing.toml")


def test_unknown_architecture_is_a_programming_error(tmp_path, write_config):
    with pytest.raises(ValueError, match="architecture"):
        load_dataset_config(write_config("[[datasets]]\n"), architecture="flux")


# ---------------------------------------------------------------------------------------------- key errors


def test_unknown_keys_get_suggestions(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(
        f'[general]\nbatchsize = 2\n\n[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'
        "resolutoin = 512\n"
    )
    message = _error(cfg)
    assert f"{cfg}: [general].batchsize: unknown key (did you mean 'batch_size'?)" in message
    assert f"{cfg}: datasets[0].resolutoin: unknown key (did you mean 'resolution'?)" in message


def test_wrong_types_say_found_and_expected(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(
        f'[general]\nenable_bucket = 1\n\n[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'
        'batch_size = "2"\nresolution = [512]\ncontrol_resolution = 8\nnum_repeats = 0\n'
    )
    message = _error(cfg)
    assert "[general].enable_bucket: expected true or false, found integer 1" in message
    assert "datasets[0].batch_size: expected a positive integer, found string '2'" in message
    assert (
        "datasets[0].resolution: expected an integer N (N x N) or [width, height], found array [512]"
        in message
    )
    assert "datasets[0].control_resolution:" in message and "at least 16" in message
    assert "datasets[0].num_repeats: expected a positive integer, found integer 0" in message


def test_every_problem_is_reported_at_once(tmp_path, write_config):
    cfg = write_config(
        '[general]\ncache_directory = "x"\nfoo = 1\n\n'
        '[[datasets]]\nimage_directory = "/nonexistent/images"\nbatch_size = -1\n\n'
        '[[datasets]]\nimage_jsonl_file = "/nonexistent/meta.jsonl"\ncache_directory = "/tmp/c"\n\n'
        '[[datasets]]\nvideo_directory = "/v"\ntarget_frames = [1]\n'
    )
    message = _error(cfg)
    lines = _lines(message)
    assert message.splitlines()[0] == f"dataset config {cfg}: {len(lines)} problems"
    assert len(lines) == 6, message
    assert all(line.strip().startswith(str(cfg)) for line in lines)
    assert any("[general].cache_directory: 'cache_directory' cannot be set in [general]" in x for x in lines)
    assert any("[general].foo: unknown key" in x for x in lines)
    assert any("datasets[0].batch_size" in x for x in lines)
    assert any("datasets[1].image_jsonl_file: file not found: /nonexistent/meta.jsonl" in x for x in lines)
    assert any(
        "datasets[2].video_directory: video datasets are not supported by tsumugi "
        "(Qwen-Image/Z-Image are image models)" in x
        for x in lines
    )


def test_video_keys_in_general_are_rejected(tmp_path, write_config):
    message = _error(
        write_config('[general]\nframe_extraction = "head"\n\n[[datasets]]\nimage_directory = "x"\n')
    )
    assert "[general].frame_extraction: video datasets are not supported" in message


def test_missing_directories(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "nope"}"\n\n'
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'
        f'control_directory = "{tmp_path / "noctrl"}"\n\n'
        "[[datasets]]\nnum_repeats = 2\n"
    )
    message = _error(cfg, "qie")
    assert f"datasets[0].image_directory: directory not found: {tmp_path / 'nope'}" in message
    assert f"datasets[1].control_directory: directory not found: {tmp_path / 'noctrl'}" in message
    assert "datasets[2]: needs image_directory or image_jsonl_file" in message


def test_duplicate_cache_directories(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    captioned(tmp_path / "other", ["b.png"])
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n\n'
        f'[[datasets]]\nimage_directory = "{tmp_path / "other"}"\ncache_directory = "{tmp_path / "imgs"}"\n'
    )
    message = _error(cfg)
    assert (
        f"datasets[1].cache_directory: same cache directory as datasets[0] ({tmp_path / 'imgs'})" in message
    )


def test_resolution_must_be_multiple_of_16_without_buckets(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = [1000, 600]\n')
    assert "datasets[0].resolution: 1000x600 must be multiples of 16" in _error(cfg)
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = [1000, 600]\n'
        "enable_bucket = true\n",
        name="ok.toml",
    )
    assert _load(cfg)[0].resolution == (1000, 600)


# ---------------------------------------------------------------------------------------------- files


def test_images_without_caption_are_skipped_with_a_warning(
    tmp_path, captioned, make_image, write_config, data_warnings
):
    images = tmp_path / "imgs"
    captioned(images, ["a.png"])
    make_image(images / "lonely.png")
    (images / "orphan.txt").write_text("no image for me")
    (images / "sub").mkdir()
    make_image(images / "sub" / "deep.png")  # not recursive
    make_image(images / ".hidden.png")
    [ds] = _load(write_config(f'[[datasets]]\nimage_directory = "{images}"\n'))
    assert [i.image_path.name for i in list_items(ds)] == ["a.png"]
    log = data_warnings()
    assert f"1 image(s) without a '.txt' caption file skipped: {images / 'lonely.png'}" in log
    assert "caption file(s) without an image" in log and "orphan.txt" in log


def test_bad_image_files_are_named(tmp_path, captioned, make_image, write_config):
    images = tmp_path / "imgs"
    captioned(images, ["good.png", "empty.png", "cut.jpg", "junk.webp", "tiny.png"])
    (images / "empty.png").write_bytes(b"")
    make_image(images / "cut.jpg", size=(256, 256))
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    (images / "junk.webp").write_text("not an image")
    make_image(images / "tiny.png", size=(8, 40))
    message = _error(write_config(f'[[datasets]]\nimage_directory = "{images}"\nresolution = 64\n'))
    assert f"datasets[0]: {images / 'empty.png'}: empty file (0 bytes)" in message
    assert f"datasets[0]: {images / 'cut.jpg'}: corrupt or truncated image" in message
    assert f"datasets[0]: {images / 'junk.webp'}: not a readable image" in message
    assert f"datasets[0]: {images / 'tiny.png'}: image is 8x40; both sides must be at least 16 px" in message
    assert "good.png" not in message
    assert len(_lines(message)) == 4


def test_small_images_warn_unless_no_upscale(tmp_path, captioned, write_config, data_warnings):
    captioned(tmp_path / "imgs", ["small.png"], size=(20, 20))
    base = f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = 64\nenable_bucket = true\n'
    _load(write_config(base))
    assert (
        "smaller than 1/4 of the bucket area (64x64)" in data_warnings()
        and "small.png (20x20)" in data_warnings()
    )
    _load(write_config(base + "bucket_no_upscale = true\n", name="b.toml"))
    assert data_warnings().count("smaller than 1/4") == 1


def test_exif_rotated_image_size(tmp_path, write_config):
    images = tmp_path / "imgs"
    images.mkdir()
    img = Image.fromarray(np.zeros((32, 64, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(images / "r.jpg", exif=exif.tobytes())
    (images / "r.txt").write_text("rotated")
    [ds] = _load(write_config(f'[[datasets]]\nimage_directory = "{images}"\n'))
    assert list_items(ds)[0].original_size == (32, 64)


def test_stem_collision_is_an_error(tmp_path, captioned, write_config):
    images = tmp_path / "imgs"
    captioned(images, ["a.png", "a.jpg", "b.png"])
    message = _error(write_config(f'[[datasets]]\nimage_directory = "{images}"\n'))
    assert f"{images / 'a.jpg'}, {images / 'a.png'} share the file stem 'a'" in message


def test_caption_extension_without_dot_warns(tmp_path, captioned, write_config, data_warnings):
    captioned(tmp_path / "imgs", ["a.png"], ext="caption")
    [ds] = _load(
        write_config(
            f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\ncaption_extension = "caption"\n'
        )
    )
    assert len(list_items(ds)) == 1
    assert "datasets[0].caption_extension: 'caption' does not start with '.'" in data_warnings()


def test_empty_directory_is_an_error(tmp_path, write_config):
    (tmp_path / "imgs").mkdir()
    message = _error(write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'))
    assert f"datasets[0]: no usable images found in {tmp_path / 'imgs'}" in message


# ---------------------------------------------------------------------------------------------- controls


def _edit_set(tmp_path, captioned, make_image, controls: dict[str, list[tuple[int, int]]]):
    images, ctrl = tmp_path / "imgs", tmp_path / "ctrl"
    captioned(images, [f"{stem}.png" for stem in controls])
    for stem, sizes in controls.items():
        for i, size in enumerate(sizes):
            make_image(ctrl / f"{stem}_{i}.png", size=size, seed=10 + i)
    return images, ctrl


def test_edit_uses_all_controls_in_order(tmp_path, captioned, make_image, write_config):
    images, ctrl = _edit_set(
        tmp_path, captioned, make_image, {"img1": [(64, 64), (32, 48)], "img10": [(48, 48)]}
    )
    make_image(ctrl / "img1_10.png")
    make_image(ctrl / "img1.png")
    cfg = write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n')
    [ds] = _load(cfg, "qie")
    one, ten = list_items(ds)
    assert [p.name for p in one.control_paths] == ["img1.png", "img1_0.png", "img1_1.png", "img1_10.png"]
    assert one.control_sizes == ((64, 48), (64, 64), (32, 48), (64, 48))
    assert [p.name for p in ten.control_paths] == ["img10_0.png"]
    assert ds.has_control
    [qi] = _load(cfg, "qi")
    assert [p.name for p in list_items(qi)[0].control_paths] == ["img1.png"]


def test_control_missing_for_a_target_trains_it_without(tmp_path, captioned, make_image, write_config,
                                                         data_warnings):
    """Musubi trains Edit items without controls as text-to-image items (musubi-tuner#682)."""
    images, ctrl = _edit_set(tmp_path, captioned, make_image, {"a": [(64, 64)]})
    captioned(images, ["b.png"])
    [ds] = _load(write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n'), "qie")
    a, b = list_items(ds)
    assert [p.name for p in a.control_paths] == ["a_0.png"] and b.control_paths == () and b.control_sizes == ()
    assert (f"datasets[0]: 1 of 2 item(s) have no control image in {ctrl} (<stem>.<ext> or <stem>_0.<ext>, ...) "
            f"and train as text-to-image items: {images / 'b.png'}") in data_warnings()
    (ctrl / "a_0.png").rename(ctrl / "x_0.png")  # a control_directory that matches nothing is warned about too
    _load(write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n'), "qie")
    assert f"datasets[0]: 2 of 2 item(s) have no control image in {ctrl}" in data_warnings()


def test_non_numeric_control_suffix(tmp_path, captioned, make_image, write_config):
    images, ctrl = _edit_set(tmp_path, captioned, make_image, {"a": [(64, 64)]})
    make_image(ctrl / "a_mask.png")
    message = _error(
        write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n'), "qie"
    )
    assert f"{ctrl / 'a_mask.png'}: control image name has a non-numeric suffix" in message


def test_corrupt_control_image_is_named(tmp_path, captioned, make_image, write_config):
    images, ctrl = _edit_set(tmp_path, captioned, make_image, {"a": [(64, 64)]})
    (ctrl / "a_0.png").write_bytes(b"")
    message = _error(
        write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n'), "qie"
    )
    assert f"control image {ctrl / 'a_0.png'}: empty file" in message


def test_edit_directory_without_control_directory_is_text_to_image(tmp_path, captioned, write_config,
                                                                   data_warnings):
    captioned(tmp_path / "imgs", ["a.png"])
    [ds] = _load(write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'), "qie")
    assert [item.control_paths for item in list_items(ds)] == [()] and not ds.has_control
    assert "control" not in data_warnings()  # a whole text-to-image dataset is not a mistake to warn about


def test_zimage_ignores_controls_with_a_warning(tmp_path, captioned, make_image, write_config, data_warnings):
    images, ctrl = _edit_set(tmp_path, captioned, make_image, {"a": [(64, 64)]})
    [ds] = _load(
        write_config(f'[[datasets]]\nimage_directory = "{images}"\ncontrol_directory = "{ctrl}"\n'), "zi"
    )
    assert ds.control_directory is None and list_items(ds)[0].control_paths == ()
    assert "datasets[0]: control_directory unused: Z-Image has no control images" in data_warnings()


# ---------------------------------------------------------------------------------------------- JSONL


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8"
    )
    return path


def test_jsonl_dataset_with_controls(tmp_path, make_image, write_config):
    a, b = make_image(tmp_path / "out" / "a.png"), make_image(tmp_path / "out" / "b.png", size=(48, 64))
    c0, c1, c2 = (make_image(tmp_path / "in" / f"c{i}.png", size=(32 + 16 * i, 32)) for i in range(3))
    meta = _jsonl(
        tmp_path / "meta.jsonl",
        [
            {"image_path": str(b), "control_path_1": str(c2), "control_path_0000": str(c1), "caption": "two"},
            "",
            {"image_path": str(a), "control_path": str(c0), "caption": " one ", "extra": 1},
        ],
    )
    cfg = write_config(
        f'[[datasets]]\nimage_jsonl_file = "{meta}"\ncache_directory = "{tmp_path / "cache"}"\n'
    )
    [ds] = _load(cfg, "qie")
    assert ds.is_jsonl and ds.cache_directory == tmp_path / "cache"
    first, second = list_items(ds)
    assert first.image_path == a and first.caption == " one " and first.control_paths == (c0,)
    assert second.control_paths == (c1, c2) and second.original_size == (48, 64)
    assert second.control_sizes == ((48, 32), (64, 32))


def test_jsonl_edit_lines_without_controls(tmp_path, make_image, write_config, data_warnings):
    a, b, c = (make_image(tmp_path / f"{n}.png") for n in "abc")
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"image_path": str(a), "control_path": str(c), "caption": "x"},
                                              {"image_path": str(b), "caption": "y"}])
    plain = _jsonl(tmp_path / "plain.jsonl", [{"image_path": str(b), "caption": "y"}])
    cfg = write_config(f'[[datasets]]\nimage_jsonl_file = "{mixed}"\ncache_directory = "{tmp_path / "c1"}"\n'
                       f'[[datasets]]\nimage_jsonl_file = "{plain}"\ncache_directory = "{tmp_path / "c2"}"\n')
    first, second = _load(cfg, "qie")
    assert [i.control_paths for i in list_items(first)] == [(c,), ()]
    assert [i.control_paths for i in list_items(second)] == [()]
    warnings = data_warnings()
    assert "datasets[0]: 1 of 2 item(s) have no control image (no control_path in its JSONL line)" in warnings
    assert "datasets[1]: 1 of 1" not in warnings and warnings.count("text-to-image") == 1


def test_jsonl_line_errors_name_the_line(tmp_path, make_image, write_config):
    a = make_image(tmp_path / "a.png")
    meta = _jsonl(
        tmp_path / "meta.jsonl",
        [
            {"image_path": str(a), "caption": "fine"},
            '{"image_path": "x.png", "caption": ',
            {"image_path": str(a)},
            {"imagepath": str(a), "caption": "typo"},
            {"image_path": str(tmp_path / "gone.png"), "caption": "missing file"},
            [1, 2],
        ],
    )
    cfg = write_config(
        f'[[datasets]]\nimage_jsonl_file = "{meta}"\ncache_directory = "{tmp_path / "cache"}"\n'
    )
    message = _error(cfg)
    assert f"datasets[0]: {meta} line 2: not valid JSON" in message
    assert f"datasets[0]: {meta} line 3: missing 'caption'" in message
    assert (
        f"datasets[0]: {meta} line 4: missing 'image_path' (found 'imagepath'; did you mean 'image_path'?)"
        in message
    )
    assert (
        f"datasets[0]: {meta} line 5: 'image_path': image file not found: {tmp_path / 'gone.png'}" in message
    )
    assert f"datasets[0]: {meta} line 6: expected a JSON object, found list" in message
    assert len(_lines(message)) == 5


def test_jsonl_requires_cache_directory(tmp_path, make_image, write_config):
    a = make_image(tmp_path / "a.png")
    meta = _jsonl(tmp_path / "meta.jsonl", [{"image_path": str(a), "caption": "x"}])
    message = _error(write_config(f'[[datasets]]\nimage_jsonl_file = "{meta}"\n'))
    assert "datasets[0].cache_directory: required for image_jsonl_file datasets" in message


def test_jsonl_relative_paths_fall_back_to_the_jsonl_folder(tmp_path, make_image, write_config, monkeypatch):
    make_image(tmp_path / "data" / "pics" / "a.png")
    meta = _jsonl(tmp_path / "data" / "meta.jsonl", [{"image_path": "pics/a.png", "caption": "x"}])
    monkeypatch.chdir(tmp_path)
    cfg = write_config(f'[[datasets]]\nimage_jsonl_file = "{meta}"\ncache_directory = "cache"\n')
    [ds] = _load(cfg)
    assert list_items(ds)[0].image_path == tmp_path / "data" / "pics" / "a.png"
    assert ds.cache_directory == tmp_path / "cache"


# ---------------------------------------------------------------------------------------------- layered


def _layered_dir(root: Path, captioned, make_image, layers: dict[str, int]) -> Path:
    captioned(root, [f"{stem}.png" for stem in layers])
    for stem, count in layers.items():
        for n in range(1, count + 1):
            make_image(root / f"{stem}_{n}.png", mode="RGBA", seed=n)
    return root


def test_layered_directory(tmp_path, captioned, make_image, write_config):
    root = _layered_dir(tmp_path / "layers", captioned, make_image, {"poster": 3, "card": 3})
    make_image(root / "poster_10.png", mode="RGBA")
    make_image(root / "card_4.png", mode="RGBA")  # same layer count for every item
    cfg = write_config(f'[[datasets]]\nimage_directory = "{root}"\nmultiple_target = true\n')
    [ds] = _load(cfg, "qil")
    card, poster = list_items(ds)
    assert [p.name for p in poster.extra_target_paths] == [
        "poster_1.png",
        "poster_2.png",
        "poster_3.png",
        "poster_10.png",
    ]
    assert poster.num_targets == 5 and card.num_targets == 5


def test_layered_directory_errors(tmp_path, captioned, make_image, write_config):
    root = _layered_dir(tmp_path / "layers", captioned, make_image, {"a": 2, "b": 2, "c": 3, "d": 0})
    (root / "a_2.txt").write_text("stray caption")
    make_image(root / "b_2.png", mode="RGB")  # overwrite a layer without alpha
    message = _error(
        write_config(f'[[datasets]]\nimage_directory = "{root}"\nmultiple_target = true\n'), "qil"
    )
    assert f"{root / 'a_2.png'}: looks like layer 2 of 'a' but has a caption file" in message
    assert f"{root / 'c.png'}: has 3 layer(s) but most items have" in message
    assert f"{root / 'd.png'}: no layer images (expected d_1.png, d_2.png, ...)" in message
    assert f"layer image {root / 'b_2.png'}: no alpha channel (mode RGB)" in message


def test_layered_jsonl(tmp_path, make_image, write_config):
    base = make_image(tmp_path / "base.png")
    layers = [make_image(tmp_path / f"l{i}.png", mode="RGBA") for i in range(2)]
    meta = _jsonl(
        tmp_path / "meta.jsonl",
        [
            {
                "image_path_0": str(base),
                "image_path_1": str(layers[0]),
                "image_path_2": str(layers[1]),
                "caption": "x",
            },
        ],
    )
    cfg = write_config(
        f'[[datasets]]\nimage_jsonl_file = "{meta}"\ncache_directory = "{tmp_path / "c"}"\n'
        "multiple_target = true\n"
    )
    [item] = list_items(_load(cfg, "qil")[0])
    assert item.image_path == base and item.extra_target_paths == tuple(layers)


def test_multiple_target_only_for_layered(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nmultiple_target = true\n')
    assert "datasets[0].multiple_target: multiple_target is for Qwen-Image-Layered only" in _error(cfg, "zi")
    cfg = write_config(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n', name="b.toml")
    assert "Qwen-Image-Layered needs multiple_target = true" in _error(cfg, "qil")


# ---------------------------------------------------------------------------------------------- paths


def test_relative_paths_cwd_first_then_config_folder(tmp_path, captioned, write_config, monkeypatch):
    config_dir = tmp_path / "project"
    captioned(config_dir / "imgs", ["a.png"])
    cfg = config_dir / "dataset.toml"
    cfg.write_text('[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    [ds] = _load(cfg)
    assert ds.image_directory == config_dir / "imgs"
    assert ds.cache_directory == config_dir / "cache"  # kept next to the inputs it belongs to

    captioned(elsewhere / "imgs", ["b.png"])  # now the working directory has it: Musubi's rule wins
    [ds] = _load(cfg)
    assert ds.image_directory == elsewhere / "imgs" and ds.cache_directory == elsewhere / "cache"
    assert [i.image_path.name for i in list_items(ds)] == ["b.png"]


def test_list_items_scans_a_hand_made_config(tmp_path, captioned):
    captioned(tmp_path / "imgs", ["b.png", "a.png"])
    ds = DatasetConfig(
        index=0,
        config_path=None,
        architecture="zi",
        resolution=(64, 64),
        caption_extension=".txt",
        batch_size=1,
        num_repeats=1,
        enable_bucket=False,
        bucket_no_upscale=False,
        image_directory=tmp_path / "imgs",
        image_jsonl_file=None,
        cache_directory=tmp_path / "imgs",
        control_directory=None,
        multiple_target=False,
        no_resize_control=False,
        control_resolution=None,
    )
    assert [i.image_path.name for i in list_items(ds)] == ["a.png", "b.png"]
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="a.png: empty file"):
        list_items(ds)


def test_both_sources_use_the_directory(tmp_path, captioned, write_config, data_warnings):
    captioned(tmp_path / "imgs", ["a.png"])
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nimage_jsonl_file = "x.jsonl"\n'
    )
    [ds] = _load(cfg)
    assert ds.image_jsonl_file is None and "image_jsonl_file is ignored" in data_warnings()


def test_paths_are_absolute(tmp_path, captioned, write_config, monkeypatch):
    captioned(tmp_path / "imgs", ["a.png"])
    monkeypatch.chdir(tmp_path)
    [ds] = _load(write_config('[[datasets]]\nimage_directory = "./imgs/../imgs"\n'))
    assert ds.image_directory == tmp_path / "imgs" and os.path.isabs(ds.cache_directory)
