"""The example TOMLs in dataset_configs/ load against a generated tiny image set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import toml

from tsumugi.data.config import load_dataset_config
from tsumugi.data.items import list_items

EXAMPLES = Path(__file__).resolve().parents[2] / "dataset_configs"


@pytest.mark.parametrize(
    ("name", "architecture", "controls_per_item"),
    [
        ("qwen_image_t2i.toml", "qi", 0),
        ("qwen_image_edit.toml", "qie", 1),
        ("qwen_image_edit_2509_multi.toml", "qie", 2),
        ("zimage.toml", "zi", 0),
    ],
)
def test_example_config_loads(
    tmp_path, monkeypatch, captioned, make_image, name, architecture, controls_per_item
):
    config = shutil.copy(EXAMPLES / name, tmp_path / name)
    data = toml.load(config)
    for i, table in enumerate(data["datasets"]):
        images = captioned(
            tmp_path / table["image_directory"], ["p001.png", "p002.jpg"], size=(96, 64 + 16 * i)
        )
        if "control_directory" in table:
            for image in images:
                names = (
                    [f"{image.stem}.png"]
                    if controls_per_item == 1
                    else [f"{image.stem}_{k}.png" for k in range(controls_per_item)]
                )
                for k, control in enumerate(names):
                    make_image(tmp_path / table["control_directory"] / control, size=(64 + 32 * k, 64))
    workdir = tmp_path / "somewhere_else"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # relative paths resolve next to the config

    datasets = load_dataset_config(config, architecture=architecture)
    assert len(datasets) == len(data["datasets"])
    for dataset, table in zip(datasets, data["datasets"]):
        assert dataset.image_directory == tmp_path / table["image_directory"]
        assert dataset.cache_directory == tmp_path / table["cache_directory"]
        items = list_items(dataset)
        assert [i.image_path.name for i in items] == ["p001.png", "p002.jpg"]
        assert all(len(i.control_paths) == controls_per_item for i in items)
