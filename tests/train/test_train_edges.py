"""The training loop at its edges: epochs with gradient accumulation, per-dataset noise, schedule-free
optimizers, sampling resources, metadata and trackers after a failure."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_train_network import cache_dataset, run

from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.train import trainer
from tsumugi.train.cached_data import CachedTrainingData
from tsumugi.train.checkpoint_hooks import CheckpointHooks


@pytest.fixture(scope="module")
def three_items(tiny_sets, tmp_path_factory):
    """Z-Image: 3 images of one bucket, batch size 1 (3 batches per epoch), cached."""
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path_factory.mktemp("three"), count=3, sizes=[(64, 64)], batch_size=1)
    cache_dataset("zimage", toml, files)
    return toml, files


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def record_steps(monkeypatch) -> tuple[list[list[str]], list[list[float]]]:
    """Per optimizer step: the cache files loaded and the micro-batch losses (wrapping our own functions)."""
    steps: list[list[str]] = [[]]
    losses: list[list[float]] = [[]]
    load, loss_fn, on_step = CachedTrainingData.load, trainer.micro_batch_loss, CheckpointHooks.on_step

    def recording_load(self, items):
        steps[-1].extend(i.latent_path.name for i in items)
        return load(self, items)

    def recording_loss(*args, **kwargs):
        loss, sigmas = loss_fn(*args, **kwargs)
        losses[-1].append(loss.item())
        return loss, sigmas

    def recording_on_step(self, progress, loss, average, sigmas):
        steps.append([])
        losses.append([])
        return on_step(self, progress, loss, average, sigmas)

    monkeypatch.setattr(CachedTrainingData, "load", recording_load)
    monkeypatch.setattr(trainer, "micro_batch_loss", recording_loss)
    monkeypatch.setattr(CheckpointHooks, "on_step", recording_on_step)
    return steps, losses


def test_epoch_is_one_pass_with_gradient_accumulation(three_items, tmp_path, monkeypatch):
    """3 batches, accumulation 2: each epoch is 2 steps (2 micro-batches, then the 1 left), epoch files are
    written after the epoch's last step, and the short step's loss is the mean over what it accumulated."""
    toml, files = three_items
    steps, micro = record_steps(monkeypatch)
    result = run("zimage", toml, files, tmp_path, "--gradient_accumulation_steps", "2", "--max_train_epochs", "2",
                 "--save_every_n_epochs", "1")
    steps, micro = steps[:-1], micro[:-1]
    assert result.global_step == 4
    assert [len(s) for s in steps] == [2, 1, 2, 1]
    names = sorted({n for s in steps for n in s})
    assert len(names) == 3
    assert sorted(steps[0] + steps[1]) == names and sorted(steps[2] + steps[3]) == names, steps
    for step_loss, losses in zip(result.losses, micro):
        assert step_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert _metadata(tmp_path / "lora-000001.safetensors")["ss_steps"] == "2"
    meta = _metadata(tmp_path / "lora.safetensors")
    assert meta["ss_steps"] == "4" and meta["ss_epoch"] == "2"


def test_resume_across_an_epoch_boundary_with_accumulation(three_items, tmp_path):
    toml, files = three_items
    common = ("--gradient_accumulation_steps", "2", "--max_train_epochs", "2", "--network_dropout", "0.1")
    full = run("zimage", toml, files, tmp_path / "full", *common, "--save_state", "--save_every_n_steps", "1")
    for step in (1, 2):  # mid-epoch (before the short step) and right at the boundary
        state = tmp_path / f"full/lora-step{step:08d}-state"
        resumed = run("zimage", toml, files, tmp_path / f"r{step}", *common, "--resume", str(state))
        assert resumed.global_step == 4 and resumed.losses == full.losses[step:]
        a = safe_open(str(tmp_path / "full/lora.safetensors"), "pt")
        b = safe_open(str(tmp_path / f"r{step}/lora.safetensors"), "pt")
        for key in a.keys():
            assert a.get_tensor(key).equal(b.get_tensor(key)), key


def test_same_image_in_two_datasets_draws_different_noise(tiny_sets, tmp_path, monkeypatch):
    """One image listed by two dataset entries (each with its own cache): both land in one step (accumulation
    2) and must get their own noise and sigma, though their cache files have the same name."""
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", count=1, sizes=[(64, 64)])
    text = toml.read_text()
    second = text[text.index("[[datasets]]"):].replace(str(tmp_path / "ds/cache"), str(tmp_path / "ds/cache2"))
    toml.write_text(text + "\n" + second)
    cache_dataset("zimage", toml, files)
    drawn: list[tuple[int, str, int, float]] = []
    loss_fn = trainer.micro_batch_loss

    def recording_loss(arch, dit, data, items, generators, *rest):
        loss, sigmas = loss_fn(arch, dit, data, items, generators, *rest)
        drawn.extend((i.dataset_index, i.latent_path.name, g.initial_seed(), float(s))
                     for i, g, s in zip(items, generators, sigmas))
        return loss, sigmas

    monkeypatch.setattr(trainer, "micro_batch_loss", recording_loss)
    run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "1", "--gradient_accumulation_steps", "2")
    (a, b) = sorted(drawn)
    assert (a[0], b[0]) == (0, 1) and a[1] == b[1], "the same image (same cache file name) from both datasets"
    assert a[2] != b[2] and a[3] != b[3], "each dataset entry must draw its own noise and sigma"


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"])
def test_schedule_free_trains_and_saves_the_averaged_weights(name, three_items, tmp_path):
    """The real ``schedulefree`` optimizers: training runs, and the saved LoRA holds the eval-mode (averaged)
    weights, computed here by loading the end state into a fresh network and optimizer and calling eval()."""
    import safetensors.torch
    import torch

    from tsumugi.models.loader import load_dit
    from tsumugi.models.safetensors_io import SafetensorsSource
    from tsumugi.networks import lora_zimage
    from tsumugi.train.optimizers import create_optimizer
    from tsumugi.train.state import OPTIMIZER_FILE, WEIGHTS_FILE, _decode, read_state_file

    toml, files = three_items
    lr = "0.5" if name == "SGDScheduleFree" else "1e-2"
    # RAdam's rectification holds the weights still for the first steps: 6 steps move them
    result = run("zimage", toml, files, tmp_path, "--optimizer_type", name, "--learning_rate", lr,
                 "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state_on_train_end")
    assert result.global_step == 6 and all(torch.isfinite(torch.tensor(result.losses)))

    def network():
        dit = load_dit(str(files["dit"]), "zimage", dtype=torch.float32)
        net = lora_zimage.create_network(dit, 4, 2.0, None, None)
        net.apply_to()
        return net

    state = tmp_path / "lora-state"
    trained = network()
    trained.load_state_dict(safetensors.torch.load_file(state / WEIGHTS_FILE))
    args = argparse.Namespace(optimizer_type=name, optimizer_args=None, learning_rate=float(lr))
    optimizer, _ = create_optimizer(args, trained.prepare_optimizer_params(float(lr), None))
    with SafetensorsSource([state / OPTIMIZER_FILE]) as source:
        optimizer.load_state_dict(_decode(read_state_file(state)["optimizer"], source, state / OPTIMIZER_FILE))
    assert all(group["train_mode"] for group in optimizer.param_groups), "the state is saved in train mode"
    train_mode = {k: v.clone() for k, v in trained.state_dict().items()}
    optimizer.eval()
    averaged = trained.state_dict()
    saved = network()
    saved.load_weights(str(result.path))
    moved = [k for k in averaged if not torch.equal(averaged[k], train_mode[k])]
    assert moved, "eval mode must change the weights, or this test proves nothing"
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, averaged[key], rtol=1e-6, atol=1e-7, msg=key)


def test_schedule_free_resume_is_exact(three_items, tmp_path):
    toml, files = three_items
    common = ("--optimizer_type", "AdamWScheduleFree", "--max_train_steps", "4")
    full = run("zimage", toml, files, tmp_path / "full", *common, "--save_every_n_steps", "2", "--save_state")
    resumed = run("zimage", toml, files, tmp_path / "r", *common, "--resume",
                  str(tmp_path / "full/lora-step00000002-state"))
    assert resumed.losses == full.losses[2:]
    a, b = safe_open(str(full.path), "pt"), safe_open(str(resumed.path), "pt")
    assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())


def test_num_epochs_metadata_is_the_computed_count(three_items, tmp_path):
    toml, files = three_items
    result = run("zimage", toml, files, tmp_path, "--max_train_steps", "5", "--gradient_accumulation_steps", "2")
    meta = _metadata(result.path)  # 2 steps per epoch: 5 steps cover 3 epochs (the last one partly)
    assert meta["ss_num_epochs"] == "3" and meta["ss_max_train_steps"] == "5"


def test_tensorboard_keeps_the_steps_logged_before_a_failure(three_items, tmp_path):
    """A run that fails at step 2 (its step checkpoint cannot be written) leaves steps 1 and 2 in the
    TensorBoard event file, and its trackers are ended on the way out (no writer left running)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toml, files = three_items
    (tmp_path / "o/lora-step00000002.safetensors").mkdir(parents=True)  # the rename onto it fails
    writers_before = sum(type(t).__name__ == "_AsyncWriterThread" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(OSError):
        run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "4", "--save_every_n_steps", "2",
            "--logging_dir", str(tmp_path / "logs"))
    (event_file,) = (tmp_path / "logs").rglob("events.out.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"histograms": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("loss/current")] == [1, 2]
    assert [h.step for h in events.Histograms("timesteps")] == [1, 2]
    writers = [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()]
    assert len(writers) == writers_before, "the TensorBoard writer must be closed (its thread ended)"


def test_sample_resources_are_loaded_before_the_dit_and_freed(three_items, tmp_path, monkeypatch):
    """Sample prompts are encoded and the text encoder is gone before the DiT loads; the VAE is loaded (so
    checked) before the DiT too and waits on the CPU. Recorded by wrapping our own loader functions."""
    import gc
    import weakref

    from tsumugi.models import loader

    toml, files = three_items
    events: list[tuple] = []
    alive: dict[str, weakref.ref] = {}

    def recording(name, load):
        def wrapped(*args, **kwargs):
            model = load(*args, **kwargs)
            alive[name] = weakref.ref(model)
            events.append((name, kwargs.get("dtype")))
            return model
        return wrapped

    def recording_dit(*args, **kwargs):
        encoder = alive.get("text_encoder")
        vae = alive.get("vae")
        events.append(("dit", "text encoder alive" if encoder and encoder() is not None else "text encoder freed",
                       str(next(vae().parameters()).device) if vae and vae() is not None else None))
        return load_dit(*args, **kwargs)

    load_dit = loader.load_dit
    monkeypatch.setattr(loader, "load_text_encoder", recording("text_encoder", loader.load_text_encoder))
    monkeypatch.setattr(loader, "load_vae", recording("vae", loader.load_vae))
    monkeypatch.setattr(loader, "load_dit", recording_dit)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple --w 32 --h 32 --d 3 --s 2\n")
    run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "2", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "2", "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]))
    gc.collect()
    assert events == [("text_encoder", torch.float32), ("vae", torch.float32),
                      ("dit", "text encoder freed", "cpu")], events
    assert len(list((tmp_path / "o/sample").glob("*.png"))) == 1
    assert alive["vae"]() is None or str(next(alive["vae"]().parameters()).device) == "cpu"


def test_sample_prompts_without_a_trigger_load_nothing(three_items, tmp_path, monkeypatch, caplog):
    from tsumugi.models import loader

    toml, files = three_items
    loaded: list[str] = []
    for name in ("load_text_encoder", "load_vae"):
        original = getattr(loader, name)
        monkeypatch.setattr(loader, name, lambda *a, _f=original, _n=name, **k: loaded.append(_n) or _f(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple --w 32 --h 32\n")
    run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "1", "--sample_prompts", str(prompts),
        "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]))
    assert loaded == []
    assert "--sample_prompts has no effect" in caplog.text


def test_fused_backward_pass_gives_no_scheduler_order_warning(three_items, tmp_path):
    """The fused pass steps every parameter inside the backward, so torch never sees optimizer.step(); its
    'lr_scheduler.step() before optimizer.step()' warning is silenced for exactly that call."""
    import warnings

    from test_full_training import ADAFACTOR, run_full

    toml, files = three_items
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_full("zimage", toml, files, tmp_path, *ADAFACTOR, "--fused_backward_pass", "--max_train_steps", "2")
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]


def test_log_lines_are_not_glued_to_the_progress_bar(three_items, tmp_path, capsys, caplog):
    import logging
    import sys

    toml, files = three_items
    caplog.set_level("INFO")
    handler = logging.StreamHandler(sys.stderr)  # what the console scripts' basicConfig installs
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        run("zimage", toml, files, tmp_path, "--max_train_steps", "3", "--save_every_n_steps", "1")
    finally:
        logging.getLogger().removeHandler(handler)
    segments = capsys.readouterr().err.replace("\r", "\n").split("\n")
    saved = [s for s in segments if "tsumugi.train.checkpoint_hooks: saved" in s or "saved /" in s]
    assert len(saved) == 3 and all(s.startswith("INFO tsumugi") for s in saved), saved


def test_counts_and_family_names_in_logs(three_items, tmp_path, caplog):
    from tsumugi.counts import format_count

    assert [format_count(n) for n in (20_430_000_000, 1_200_000, 9712, 512)] == ["20.43B", "1.2M", "9.71K", "512"]
    toml, files = three_items
    with caplog.at_level("INFO"):
        run("zimage", toml, files, tmp_path, "--max_train_steps", "1")
    assert "LoRA for Z-Image: " in caplog.text and "z_image" not in caplog.text
