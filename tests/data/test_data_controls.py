"""Control image matching and JSONL control key normalisation.

See docs/design.md, "Dataset items and batches".
"""

from __future__ import annotations

from tsumugi.data.controls import jsonl_control_paths, match_controls


def test_img1_does_not_take_img10_controls():
    result = match_controls(
        ["img1", "img10"],
        ["img10_0.png", "img1_10.png", "img1.png", "img10_1.png", "img1_2.png", "img1_0.png"],
    )
    assert result.matches == {
        "img1": ["img1.png", "img1_0.png", "img1_2.png", "img1_10.png"],
        "img10": ["img10_0.png", "img10_1.png"],
    }
    assert not result.bad_suffix and not result.unused


def test_longest_stem_is_matched_first():
    # "a_1_0.png" and "a_1.png" start with "a_" too; processed first, "a_1" keeps them
    result = match_controls(["a", "a_1"], ["a.png", "a_0.png", "a_1.png", "a_1_0.png"])
    assert result.matches == {"a_1": ["a_1.png", "a_1_0.png"], "a": ["a.png", "a_0.png"]}


def test_zero_padded_suffixes_sort_numerically():
    result = match_controls(["p"], ["p_0002.png", "p_0000.png", "p_0010.png", "p_0001.png"])
    assert result.matches["p"] == ["p_0000.png", "p_0001.png", "p_0002.png", "p_0010.png"]


def test_non_numeric_suffix_ambiguity_and_unused():
    result = match_controls(["img1", "b"], ["img1_mask.png", "img1_0.png", "b_0.png", "b_0.jpg", "zzz.png"])
    assert result.bad_suffix == [("img1_mask.png", "img1")]
    assert result.matches["img1"] == ["img1_0.png"]
    assert result.ambiguous == [("b", ["b_0.jpg", "b_0.png"])]
    assert result.unused == ["zzz.png"]


def test_jsonl_control_keys_are_renumbered_in_numeric_order():
    values, problems = jsonl_control_paths(
        {"image_path": "t.png", "control_path_10": "c", "control_path_0000": "a", "control_path_2": "b"}
    )
    assert values == ["a", "b", "c"] and not problems
    assert jsonl_control_paths({"control_path": "x"}) == (["x"], [])
    assert jsonl_control_paths({"caption": "no controls"}) == ([], [])


def test_jsonl_ambiguous_control_keys():
    _, problems = jsonl_control_paths({"control_path": "x", "control_path_0": "y"})
    assert problems and "control_path and control_path_0" in problems[0]
