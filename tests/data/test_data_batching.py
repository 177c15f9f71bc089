"""Batches per dataset/bucket/control sizes, repeats and the seeded epoch shuffle.

See docs/design.md, "Dataset items and batches".
"""

from __future__ import annotations

import random

from tsumugi.data.batching import BatchKey, bucket_items, caching_batches, epoch_batches
from tsumugi.data.config import load_dataset_config


def _dataset(tmp_path, captioned, write_config, extra: str = "", arch: str = "qi", name: str = "d.toml"):
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = 64\n'
        f"enable_bucket = true\n{extra}",
        name=name,
    )
    return load_dataset_config(cfg, architecture=arch)


def test_items_are_grouped_by_bucket(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", ["s1.png", "s2.png", "s3.png"], size=(64, 64))
    captioned(tmp_path / "imgs", ["w1.png"], size=(128, 64))
    captioned(tmp_path / "imgs", ["t1.png", "t2.png"], size=(32, 64))
    [ds] = _dataset(tmp_path, captioned, write_config, "batch_size = 2\n")
    groups = bucket_items(ds)
    by_bucket = {key.bucket: [i.image_path.name for i in items] for key, items in groups.items()}
    # resolution 64 buckets: 32x128, 48x80, 64x64, 80x48, 128x32
    assert by_bucket == {
        (48, 80): ["t1.png", "t2.png"],
        (64, 64): ["s1.png", "s2.png", "s3.png"],
        (80, 48): ["w1.png"],
    }
    batches = caching_batches([ds])
    assert [(b.bucket, len(b.items)) for b in batches] == [
        ((48, 80), 2),
        ((64, 64), 2),
        ((64, 64), 1),
        ((80, 48), 1),
    ]


def test_repeats_and_seeded_shuffle(tmp_path, captioned, write_config):
    captioned(tmp_path / "imgs", [f"i{n:02d}.png" for n in range(12)], size=(64, 64))
    [ds] = _dataset(tmp_path, captioned, write_config, "num_repeats = 3\nbatch_size = 4\n")
    batches = epoch_batches([ds], seed=42, epoch=1)
    names = [i.image_path.name for b in batches for i in b.items]
    assert len(batches) == 9 and len(names) == 36
    assert all(names.count(f"i{n:02d}.png") == 3 for n in range(12))
    assert batches == epoch_batches([ds], seed=42, epoch=1)
    assert batches != epoch_batches([ds], seed=42, epoch=2)

    # same sequence as Musubi's random.seed(seed + epoch) + random.shuffle (items, then batch order)
    items = [item for item in sorted(ds.items, key=lambda i: str(i.image_path)) for _ in range(3)]
    random.seed(43)
    random.shuffle(items)
    expected = [items[i : i + 4] for i in range(0, 36, 4)]
    random.shuffle(expected)
    assert [list(b.items) for b in batches] == expected

    plain = epoch_batches([ds], seed=0, epoch=0, shuffle=False)
    assert [i.image_path.name for i in plain[0].items] == ["i00.png", "i00.png", "i00.png", "i01.png"]


def test_control_sizes_and_datasets_never_share_a_batch(tmp_path, captioned, make_image, write_config):
    captioned(tmp_path / "imgs", ["a.png", "b.png", "c.png"], size=(64, 64))
    make_image(tmp_path / "ctrl" / "a.png", size=(64, 64))
    make_image(tmp_path / "ctrl" / "b.png", size=(128, 64))
    make_image(tmp_path / "ctrl" / "c.png", size=(64, 64))
    extra = f'control_directory = "{tmp_path / "ctrl"}"\ncontrol_resolution = 64\nbatch_size = 4\n'
    [ds] = _dataset(tmp_path, captioned, write_config, extra, arch="qie")
    groups = bucket_items(ds)
    assert {key: [i.image_path.name for i in items] for key, items in groups.items()} == {
        BatchKey(0, (64, 64), ((64, 64),), 1): ["a.png", "c.png"],
        BatchKey(0, (64, 64), ((80, 48),), 1): ["b.png"],
    }
    captioned(tmp_path / "imgs2", ["z.png"], size=(64, 64))
    cfg = write_config(
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\n'
        f'[[datasets]]\nimage_directory = "{tmp_path / "imgs2"}"\n',
        name="two.toml",
    )
    datasets = load_dataset_config(cfg, architecture="zi")
    for epoch in range(3):
        batches = epoch_batches(datasets, seed=1, epoch=epoch)
        assert [b.key.dataset_index for b in batches] == [0, 0, 0, 1]  # concatenated per dataset
        assert all(len({i.image_path.parent for i in b.items}) == 1 for b in batches)
