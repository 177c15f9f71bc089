"""Edit-2509 training on items without control images (trained as text-to-image items, musubi-tuner#682).

The dataset mixes both kinds the ways users write them: a pairs dataset where one image has no control
file, and a text-to-image dataset (no ``control_directory``) next to it. Independent references: the
control-less item's text cache against diffusers' ``QwenImagePipeline.encode_prompt`` (Musubi encodes
such items with Qwen-Image's text-only prompt), and its loss against the text-to-image loss computed with
diffusers' transformer (same DiT, no control tokens) by ``test_loss_reference``'s reference.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from test_loss_reference import _generators, _qwen_reference
from test_train_network import run

from tsumugi.arch import get_architecture
from tsumugi.caching.cache_files import read_cache_file
from tsumugi.caching.validate import check_caches
from tsumugi.data.config import load_dataset_config
from tsumugi.qwen_image_cache_latents import main as qwen_latents
from tsumugi.qwen_image_cache_text_encoder_outputs import main as qwen_text
from tsumugi.testing.reference import reference_pipeline
from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.train.cached_data import CachedTrainingData, TrainBatch
from tsumugi.train.timesteps import TimestepConfig
from tsumugi.train.trainer import micro_batch_loss

VERSION = "edit-2509"


@pytest.fixture(scope="module")
def mixed(tiny_sets, tmp_path_factory):
    """(toml, files, caching log): pairs dataset (3 images, img002 without its control, batch size 2) + T2I
    dataset (2)."""
    files = tiny_sets("qwen_image")
    root = tmp_path_factory.mktemp("edit_mixed")
    pairs = write_tiny_dataset(root / "pairs", 3, sizes=[(64, 64)], controls_per_item=1, batch_size=2)
    (root / "pairs" / "controls" / "img002_0.png").unlink()
    plain = write_tiny_dataset(root / "plain", 2, sizes=[(64, 64)], seed=5)
    toml = root / "dataset.toml"
    plain_block = plain.read_text(encoding="utf-8").split("[[datasets]]", 1)[1]
    toml.write_text(pairs.read_text(encoding="utf-8") + "\n[[datasets]]" + plain_block, encoding="utf-8")
    common = ["--dataset_config", str(toml), "--device", "cpu", "--model_version", VERSION]
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    caching_logger = logging.getLogger("tsumugi.caching")
    caching_logger.addHandler(handler)
    level = caching_logger.level
    caching_logger.setLevel(logging.INFO)
    try:
        assert qwen_latents([*common, "--vae", str(files["vae"])]) == 0
        assert qwen_text([*common, "--text_encoder", str(files["text_encoder"])]) == 0
    finally:
        caching_logger.removeHandler(handler)
        caching_logger.setLevel(level)
    return toml, files, messages


def _training_data(toml) -> tuple[CachedTrainingData, list]:
    datasets = load_dataset_config(toml, None, architecture="qie", verify_images=False)
    cached = check_caches(datasets, "qie", VERSION, "qwen_image")
    return CachedTrainingData(datasets, cached, "vl_embed"), [c for caches in cached for c in caches]


def test_caches_of_items_without_controls(mixed):
    toml, _, _ = mixed
    data, items = _training_data(toml)
    assert data.items_without_controls() == (3, 5)
    assert ("3 of 5 item(s) have no control image: their captions are encoded with the text-only prompt "
            "(text-to-image items)") in mixed[2]
    for item in items:
        keys = read_cache_file(item.latent_path)[0].keys()
        controls = [k for k in keys if k.startswith("latents_control_")]
        assert len(controls) == len(item.control_sizes) == (1 if item.latent_path.name < "img002" and
                                                            "pairs" in str(item.latent_path) else 0)
    # batches never mix items with and without controls (the pairs dataset has batch size 2)
    for batch in data.epoch(0, 0):
        assert len({len(item.control_sizes) for item in batch}) == 1
    assert sorted(len(b) for b in data.epoch(0, 0)) == [1, 2, 2]  # pairs: 2 with, 1 without; plain: 2


def test_text_cache_without_controls_is_the_text_to_image_prompt(mixed, tiny_sets):
    toml, _, _ = mixed
    _, items = _training_data(toml)
    without = [item for item in items if not item.control_sizes]
    pipe = reference_pipeline("qwen_image", tiny_sets("qwen_image", "diffusers"))
    for item in without:
        caption = (item.latent_path.parents[1] / "images" / (item.latent_path.name[:6] + ".txt")).read_text()
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(caption, device="cpu")
        expected = embeds[0][mask[0].bool()] if mask is not None else embeds[0]
        torch.testing.assert_close(read_cache_file(item.text_path)[0]["vl_embed"].float(), expected.float())
    with_control = next(item for item in items if item.control_sizes)
    cached = read_cache_file(with_control.text_path)[0]["vl_embed"]
    assert cached.shape[0] > 64, "an item with a control image is encoded with its image tokens"


def test_loss_of_item_without_controls_is_the_text_to_image_loss(mixed, tiny_sets):
    toml, files, _ = mixed
    data, items = _training_data(toml)
    item = next(i for i in items if not i.control_sizes and "pairs" in str(i.latent_path))
    arch = get_architecture("qwen_image")
    dit = arch.load_dit(str(files["dit"]), dtype=torch.float32, device="cpu", model_version=VERSION)
    config = TimestepConfig(timestep_sampling="uniform", weighting_scheme="none")
    pair = [item, item]  # the reference replays two generators
    with torch.no_grad():
        loss, sigmas = micro_batch_loss(arch, dit, data, pair, _generators(), config, "none",
                                        torch.device("cpu"), contextlib.nullcontext)
    pipe = reference_pipeline("qwen_image", tiny_sets("qwen_image", "diffusers"))
    caption = (item.latent_path.parents[1] / "images" / "img002.txt").read_text()
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(caption, device="cpu")
    text = embeds[0][mask[0].bool()] if mask is not None else embeds[0]
    latents = data.load(pair).latents
    t2i = TrainBatch(latents, [text, text], [], item.bucket, [item.latent_path] * 2)
    expected, expected_sigmas = _qwen_reference(pipe.transformer, t2i, config, "none")
    assert torch.equal(sigmas, expected_sigmas)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=0)


def test_training_logs_the_count_and_runs(mixed, tmp_path, caplog):
    toml, files, _ = mixed
    caplog.set_level(logging.INFO, logger="tsumugi.train")
    result = run("qwen_image", toml, files, tmp_path, "--model_version", VERSION, "--max_train_steps", "5")
    assert len(result.losses) == 5 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "3 of 5 item(s) have no control image and train as text-to-image items" in caplog.text
