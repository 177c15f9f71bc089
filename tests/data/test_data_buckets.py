"""Bucket list, assignment, resizing and the control resize policy (docs/design.md, "Buckets and
control images")."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tsumugi.data.buckets import (
    BucketSelector,
    area_resize,
    bucket_for_area,
    control_target_size,
    make_buckets,
    resize_control,
    resize_to_bucket,
    vl_input_size,
)


@pytest.mark.parametrize(
    ("resolution", "count", "first", "last", "near_square"),
    [
        ((1024, 1024), 65, (512, 2048), (2048, 512), [(1008, 1040), (1024, 1024), (1040, 1008)]),
        ((1328, 1328), 85, (656, 2688), (2688, 656), [(1312, 1344), (1328, 1328), (1344, 1312)]),
        ((960, 544), 47, (352, 1472), (1472, 352), [(704, 736), (720, 720), (736, 704)]),
        ((512, 512), 33, (256, 1024), (1024, 256), [(496, 528), (512, 512), (528, 496)]),
    ],
)
def test_bucket_table(resolution, count, first, last, near_square):
    buckets = make_buckets(resolution)
    assert len(buckets) == count
    assert buckets[0] == first and buckets[-1] == last
    assert [b for b in buckets if abs(b[0] - b[1]) <= 32] == near_square
    assert buckets == sorted(set(buckets))
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)


def test_without_bucketing_the_resolution_is_the_only_bucket():
    selector = BucketSelector((960, 544), enable_bucket=False, bucket_no_upscale=True)
    assert selector.buckets == [(960, 544)]
    assert not selector.bucket_no_upscale
    assert selector.assign((100, 3000)) == (960, 544)


def test_assignment_picks_the_closest_aspect_ratio_first_on_ties():
    selector = BucketSelector((1024, 1024), enable_bucket=True)
    for size in [(1000, 500), (500, 1000), (1920, 1080), (333, 777), (1024, 1024), (4000, 3000)]:
        bucket = selector.assign(size)
        ratio = size[0] / size[1]
        errors = [abs(w / h - ratio) for w, h in selector.buckets]
        assert bucket == selector.buckets[errors.index(min(errors))]
    assert selector.assign((512, 512)) == (1024, 1024)  # enlarged when upscaling is allowed


def test_no_upscale_keeps_small_images_at_their_size():
    selector = BucketSelector((1024, 1024), enable_bucket=True, bucket_no_upscale=True)
    assert selector.assign((500, 300)) == (496, 288)
    assert selector.assign((1024, 1024)) == (1024, 1024)  # area equal: floor16 of itself
    assert selector.assign((2000, 2000)) == (1024, 1024)  # larger: normal assignment


def _image(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_to_bucket_enlarges_with_lanczos_and_crops_the_center():
    img = _image((100, 50))
    out = resize_to_bucket(img, (64, 64))  # scale 1.28 -> 128x64, crop 32 px each side
    expected = img.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_resize_to_bucket_shrinks_with_area_averaging():
    img = _image((200, 100))
    out = resize_to_bucket(img, (48, 16))  # scale 0.24 -> 48x24, crop 4 rows top and bottom
    expected = area_resize(img, (48, 24)).crop((0, 4, 48, 20))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert resize_to_bucket(img, (200, 100)) is img


def _area_reference(arr: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Exact area-weighted downscale (what OpenCV INTER_AREA computes), in float."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            lo, hi = o * scale, (o + 1) * scale
            for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                m[o, i] = max(0.0, min(hi, i + 1) - max(lo, i))
        return m / scale

    wy, wx = weights(arr.shape[0], out_h), weights(arr.shape[1], out_w)
    return np.einsum("oh,hwc,pw->opc", wy, arr.astype(float), wx)


@pytest.mark.parametrize(("src", "dst"), [((50, 30), (20, 12)), ((97, 61), (40, 25)), ((64, 64), (16, 16))])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_area_resize_matches_exact_area_average(src, dst, mode):
    img = _image(src, seed=3).convert(mode)
    ours = np.asarray(area_resize(img, dst)).astype(float)
    arr = np.asarray(img)
    reference = _area_reference(arr if arr.ndim == 3 else arr[:, :, None], *dst)
    assert np.abs(ours - reference.reshape(ours.shape)).max() <= 0.5 + 1e-6
    assert area_resize(img, src).tobytes() == img.tobytes()


def test_area_resize_integer_factor_is_a_plain_mean():
    img = _image((8, 4))
    out = np.asarray(area_resize(img, (4, 2))).astype(float)
    blocks = np.asarray(img).astype(float).reshape(2, 2, 4, 2, 3).mean(axis=(1, 3))
    assert np.abs(out - blocks).max() <= 0.5


def test_bucket_for_area():
    assert bucket_for_area((1000, 500), (1024, 1024)) == (1440, 720)
    assert bucket_for_area((800, 800), (1024, 1024)) == (1024, 1024)
    assert bucket_for_area((1024, 1024), (384, 384)) == (384, 384) == vl_input_size((1024, 1024))
    w, h = bucket_for_area((544, 960), (1024, 1024))
    assert w % 16 == 0 and h % 16 == 0 and w < h and abs(w * h - 1024 * 1024) < 1024 * 1024 * 0.05


def test_control_policy_four_cases():
    control = _image((300, 200), seed=1)
    bucket, res = (64, 64), (128, 128)
    # 1. default: the target's bucket
    assert control_target_size((300, 200), bucket, None, False) == (64, 64)
    assert resize_control(control, bucket, None, False).size == (64, 64)
    # 2. control_resolution: own aspect ratio at that area
    assert control_target_size((300, 200), bucket, res, False) == (160, 96)
    assert resize_control(control, bucket, res, False).size == (160, 96)
    # 3. no_resize_control: native size cropped to multiples of 16, no resampling
    out = resize_control(control, bucket, None, True)
    assert out.size == (288, 192)
    assert np.array_equal(np.asarray(out), np.asarray(control)[4:196, 6:294])
    # 4. no_resize_control + control_resolution: the resolution is a maximum
    assert resize_control(control, bucket, res, True).size == (160, 96)
    small = _image((100, 70))
    out = resize_control(small, bucket, res, True)
    assert out.size == (96, 64)
    assert np.array_equal(np.asarray(out), np.asarray(small)[3:67, 2:98])
