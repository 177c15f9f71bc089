"""Dry-run preview: text summary and contact sheet."""

from __future__ import annotations

from PIL import Image

from tsumugi.data.config import load_dataset_config
from tsumugi.data.preview import summarize, write_contact_sheet


def test_summary_and_contact_sheet(tmp_path, captioned, make_image, write_config):
    captioned(tmp_path / "imgs", ["a.png", "b.png"], size=(64, 64))
    captioned(tmp_path / "imgs", ["w.png"], size=(128, 64))
    make_image(tmp_path / "ctrl" / "a.png", size=(64, 64))
    make_image(tmp_path / "ctrl" / "b.png", size=(64, 64))
    make_image(tmp_path / "ctrl" / "w_0.png", size=(64, 64))
    make_image(tmp_path / "ctrl" / "w_1.png", size=(40, 80))
    cfg = write_config(
        f"[general]\nresolution = 64\nenable_bucket = true\nbatch_size = 2\n\n"
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\ncontrol_directory = "{tmp_path / "ctrl"}"\n'
        "num_repeats = 3\ncontrol_resolution = 64\n"
    )
    datasets = load_dataset_config(cfg, architecture="qie")
    text = summarize(datasets)
    assert "datasets[0]: directory" in text and "3 item(s) in 2 bucket(s)" in text
    assert "64x64 | controls 64x64: 2 item(s), 6 with repeats, 3 batch(es)" in text
    assert "80x48 | controls 64x64, 48x80: 1 item(s), 3 with repeats, 2 batch(es)" in text
    assert text.endswith("total: 5 batch(es) per epoch")

    sheet = write_contact_sheet(datasets, tmp_path / "out" / "sheet.png", thumb_size=48)
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.height >= 2 * 48 and img.width >= 3 * 48


def test_layered_contact_sheet(tmp_path, captioned, make_image, write_config):
    captioned(tmp_path / "layers", ["p.png"], size=(64, 64))
    make_image(tmp_path / "layers" / "p_1.png", size=(64, 64), mode="RGBA")
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "layers"}"\nmultiple_target = true\nresolution = 64\n'
    )
    datasets = load_dataset_config(cfg, architecture="qil")
    assert "64x64 +1 layers: 1 item(s)" in summarize(datasets)
    assert write_contact_sheet(datasets, tmp_path / "s.png", thumb_size=32).is_file()
