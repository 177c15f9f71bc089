"""Never lose a run: faults injected into real training runs of a tiny Z-Image LoRA (and a full fine-tune),
in-process and through the real console script, then resumed.

Each fault (crafted pickle, changed flag, damaged state, NaN, signal, full disk, a second run, kill -9 in a
save) is checked against what an uninterrupted run produces, bit for bit where the run continues.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from faults import kill_hard, launch, run_script, train_argv, wait_paused, write_crafted_pickle
from safetensors.torch import load_file
from test_train_network import cached, run  # noqa: F401  (cached is a fixture)

from tsumugi.errors import UserError
from tsumugi.train.state import MARKER, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def two_step_state(cached, tmp_path_factory):  # noqa: F811
    """(toml, files, state folder after 2 of 4 steps, the uninterrupted 4-step LoRA)."""
    toml, files = cached("zimage")
    root = tmp_path_factory.mktemp("resume_base")
    run("zimage", toml, files, root / "full", "--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2")
    return toml, files, root / "full/lora-step00000002-state", root / "full/lora.safetensors"


def copy_state(state: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copied-state"
    shutil.copytree(state, target)
    return target


# ---- 1. a state folder is data, never code --------------------------------------------------------------
def test_pickles_in_a_state_folder_are_never_loaded(two_step_state, tmp_path):
    toml, files, state, reference = two_step_state
    evidence = tmp_path / "code_ran"
    # accelerate's file names next to a real state: ignored, and the resume is still exact
    state = copy_state(state, tmp_path)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                 "pytorch_model.bin", "scaler.pt"):
        write_crafted_pickle(state / name, evidence)
    resumed = run("zimage", toml, files, tmp_path / "ok", "--max_train_steps", "4", "--resume", str(state))
    assert resumed.global_step == 4 and same_weights(resumed.path, reference)
    assert not evidence.exists()
    # a pickle in place of each file the loader opens: refused, naming the file
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, "rng-0.json", STATE_FILE):
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(state, damaged)
        write_crafted_pickle(damaged / name, evidence)
        with pytest.raises(UserError, match=str(damaged / name) if name != STATE_FILE else STATE_FILE):
            run("zimage", toml, files, tmp_path / "x", "--max_train_steps", "4", "--resume", str(damaged))
        assert not evidence.exists(), name


def test_a_state_in_the_old_pickle_format_is_refused(two_step_state, tmp_path):
    toml, files, state, _ = two_step_state
    old = tmp_path / "old-state"
    old.mkdir()
    evidence = tmp_path / "code_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        write_crafted_pickle(old / name, evidence)
    (old / STATE_FILE).write_text(json.dumps({"global_step": 2, "epoch": 1, "batch_index": 0, "seed": 11}))
    with pytest.raises(UserError, match="older format.*pickle"):
        run("zimage", toml, files, tmp_path / "x", "--max_train_steps", "4", "--resume", str(old))
    (old / STATE_FILE).unlink()  # a Musubi Tuner / accelerate state folder
    with pytest.raises(UserError, match="another format.*pickles"):
        run("zimage", toml, files, tmp_path / "x", "--max_train_steps", "4", "--resume", str(old))
    assert not evidence.exists()


# ---- 2. changed flags --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "expected"), [
    (("--network_dim", "8"), "--network_dim: saved 4 vs now 8"),
    (("--network_alpha", "4"), "--network_alpha: saved 2.0 vs now 4.0"),
    (("--optimizer_type", "SGD"), "--optimizer_type: saved 'torch.optim.adamw.AdamW' vs now 'torch.optim.sgd.SGD'"),
    (("--network_args", "loraplus_lr_ratio=4"), "--network_args"),
])
def test_flags_that_define_the_run_are_checked(flags, expected, two_step_state, tmp_path):
    toml, files, state, _ = two_step_state
    with pytest.raises(UserError, match="differs from the saved one") as info:
        run("zimage", toml, files, tmp_path, "--max_train_steps", "4", "--resume", str(state), *flags)
    assert expected in str(info.value)
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_changed_dataset_is_refused(two_step_state, tmp_path):
    toml, files, state, _ = two_step_state
    changed = toml.with_name("dataset_batch2_resume.toml")
    changed.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 2"))
    with pytest.raises(UserError, match=r"dataset.datasets\[0\].batch_size: saved 1 vs now 2"):
        run("zimage", changed, files, tmp_path, "--max_train_steps", "4", "--resume", str(state))


def test_a_new_learning_rate_takes_effect_and_is_logged(two_step_state, tmp_path, caplog):
    toml, files, state, reference = two_step_state
    with caplog.at_level(logging.INFO):
        result = run("zimage", toml, files, tmp_path, "--max_train_steps", "4", "--resume", str(state),
                     "--learning_rate", "5e-3", "--save_state")
    assert "resume: --learning_rate 0.005 (was 0.01) takes effect" in caplog.text
    saved = json.loads((tmp_path / "lora-state" / STATE_FILE).read_text())
    assert {g["lr"] for g in saved["optimizer"]["param_groups"]} == {5e-3}
    assert saved["scheduler"]["state"]["base_lrs"] == [5e-3] * len(saved["optimizer"]["param_groups"])
    assert not same_weights(result.path, reference)


def test_full_fine_tune_refuses_another_dit(cached, tmp_path):  # noqa: F811
    from test_full_training import four_layer_zimage, run_full

    toml, files = cached("zimage")
    run_full("zimage", toml, files, tmp_path / "a", "--max_train_steps", "1", "--save_state")
    other = four_layer_zimage(files, tmp_path)
    with pytest.raises(UserError, match="--dit.bytes: saved"):
        run_full("zimage", toml, other, tmp_path / "b", "--resume", str(tmp_path / "a/dit-state"))


# ---- 3. damaged or interrupted state folders ---------------------------------------------------------------
def damage_missing(state: Path) -> str:
    (state / OPTIMIZER_FILE).unlink()
    return f"{state / OPTIMIZER_FILE} is missing"


def damage_truncated(state: Path) -> str:
    data = (state / WEIGHTS_FILE).read_bytes()
    (state / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return f"{state / WEIGHTS_FILE} has {len(data) // 2} bytes"


def damage_garbage(state: Path) -> str:
    (state / STATE_FILE).write_text("{not json")
    return f"{state / STATE_FILE} is damaged"


@pytest.mark.parametrize("damage", [damage_missing, damage_truncated, damage_garbage])
def test_a_damaged_state_is_refused_naming_the_file(damage, two_step_state, tmp_path):
    toml, files, state, _ = two_step_state
    state = copy_state(state, tmp_path)
    expected = damage(state)
    with pytest.raises(UserError) as info:
        run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "4", "--resume", str(state))
    assert expected in str(info.value)


def test_interrupted_renames_are_recovered(two_step_state, tmp_path):
    toml, files, state, reference = two_step_state
    out = tmp_path / "o"
    out.mkdir()
    # the crash came between "state -> state.old" and "state.tmp -> state"
    os.replace(copy_state(state, tmp_path), out / "lora-step00000002-state.old")
    unfinished = out / "lora-step00000002-state.tmp"
    unfinished.mkdir()
    (unfinished / MARKER).write_text("")
    resumed = run("zimage", toml, files, tmp_path / "r", "--max_train_steps", "4", "--resume",
                  str(out / "lora-step00000002-state"))
    assert same_weights(resumed.path, reference)
    assert (out / "lora-step00000002-state" / STATE_FILE).is_file()
    assert not unfinished.exists() and not (out / "lora-step00000002-state.old").exists()


def test_leftovers_never_block_a_save(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    out = tmp_path / "o"
    out.mkdir()
    ours = out / "lora-state.old"  # left by a crash before the cleanup, next to a complete state
    ours.mkdir()
    (ours / MARKER).write_text("")
    (out / "lora-state").mkdir()
    (out / "lora-state" / MARKER).write_text("")
    (out / "lora-state" / STATE_FILE).write_text("{}")
    foreign = out / "lora-state.tmp"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    run("zimage", toml, files, out, "--max_train_steps", "1", "--save_state")
    assert json.loads((out / "lora-state" / STATE_FILE).read_text())["progress"]["global_step"] == 1
    assert not ours.exists() and not foreign.exists()
    (aside,) = out.glob("lora-state.tmp.*")
    assert (aside / "keep.txt").read_text() == "not ours", "a folder that is not ours is set aside, not deleted"


# ---- 4. non-finite loss or weights --------------------------------------------------------------------------
def test_a_blow_up_saves_the_state_before_the_bad_step(cached, tmp_path):  # noqa: F811
    """lr 1e30 makes the weights huge but finite after step 1: the loss of step 2 is inf."""
    toml, files = cached("zimage")
    with pytest.raises(UserError) as info:
        run("zimage", toml, files, tmp_path / "o", "--max_train_steps", "4", "--learning_rate", "1e30")
    state = tmp_path / "o/lora-nan-step00000000-state"
    assert str(state) in str(info.value) and "before step 1" in str(info.value)
    weights = load_file(state / WEIGHTS_FILE)
    assert all(torch.isfinite(t).all() for t in weights.values())
    ups = [t for k, t in weights.items() if "lora_up" in k]
    assert ups and all(torch.count_nonzero(t) == 0 for t in ups), "the LoRA as initialised, before any step"
    assert not (tmp_path / "o/lora.safetensors").exists(), "non-finite weights are never written"
    resumed = run("zimage", toml, files, tmp_path / "r", "--max_train_steps", "2", "--resume", str(state))
    plain = run("zimage", toml, files, tmp_path / "p", "--max_train_steps", "2")
    assert resumed.losses == plain.losses and same_weights(resumed.path, plain.path)


def test_weights_that_turn_non_finite_are_never_written(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    with pytest.raises(UserError) as info:
        run("zimage", toml, files, tmp_path / "o", "--optimizer_type", "faults.PoisonedSGD", "--max_train_steps", "4",
            "--save_every_n_steps", "2")
    state = tmp_path / "o/lora-nan-step00000001-state"
    assert "weights are not finite after step 2" in str(info.value) and str(state) in str(info.value)
    assert not list((tmp_path / "o").glob("*.safetensors")), "the step-2 checkpoint must not be written"
    run("zimage", toml, files, tmp_path / "p", "--optimizer_type", "SGD", "--max_train_steps", "1", "--save_state")
    assert same_weights(state / WEIGHTS_FILE, tmp_path / "p/lora-state" / WEIGHTS_FILE), "the state after step 1"


# ---- 5. SIGINT / SIGTERM -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script_baseline(cached, tmp_path_factory):  # noqa: F811
    toml, files = cached("zimage")
    out = tmp_path_factory.mktemp("baseline")
    result = run_script(train_argv(toml, files, out, "--max_train_steps", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return toml, files, out / "lora.safetensors"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_state(signum, code, script_baseline, tmp_path):
    toml, files, baseline = script_baseline
    out = tmp_path / "o"
    proc = launch(train_argv(toml, files, out, "--max_train_steps", "4"), pause="train-step:2", seconds=3)
    wait_paused(proc, "train-step")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    state = out / "lora-interrupted-state"
    assert f"--resume {state}" in err and (out / "lora-interrupted.safetensors").is_file()
    assert json.loads((state / STATE_FILE).read_text())["progress"]["global_step"] == 2
    assert not (out / "lora.lock").exists()
    if signum == signal.SIGTERM:
        return  # the same save as for SIGINT; resuming it is checked there
    resumed = run_script(train_argv(toml, files, tmp_path / "r", "--max_train_steps", "4", "--resume", str(state)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "r/lora.safetensors", baseline)


def test_a_second_sigint_aborts_at_once(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    out = tmp_path / "o"
    proc = launch(train_argv(toml, files, out, "--max_train_steps", "4"), pause="train-step:1", seconds=600)
    wait_paused(proc, "train-step")
    proc.send_signal(signal.SIGINT)
    while "stopping after the current optimizer step" not in proc.stderr.readline():  # the first was handled
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "aborted without saving" in err and "Traceback" not in err
    assert not (out / "lora-interrupted-state").exists() and not (out / "lora.lock").exists()


# ---- 6. disk full ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(size_bytes: int) -> Path:
        folder = tmp_path / "disk" / "out"
        folder.mkdir(parents=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs (these tests need root): {result.stderr}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_disk_full_keeps_the_checkpoint_and_saves_elsewhere(cached, small_disk, tmp_path, caplog):  # noqa: F811
    toml, files = cached("zimage")
    one = run("zimage", toml, files, tmp_path / "size", "--max_train_steps", "1").path
    size = one.stat().st_size
    out = small_disk(((size + 4095) // 4096 + 1) * 4096)  # room for one LoRA file and the lock
    with caplog.at_level(logging.WARNING):
        result = run("zimage", toml, files, out, "--max_train_steps", "3", "--save_every_n_steps", "2")
    checkpoint = out / "lora-step00000002.safetensors"
    assert checkpoint.is_file() and load_file(checkpoint)  # intact and loadable
    assert result.path == out.parent / "lora.safetensors" and result.path.is_file()
    message = caplog.text
    assert f"no space left on the device while writing {out / 'lora.safetensors'}: it needs" in message
    assert f"saved it to {result.path} instead" in message
    assert not list(out.glob(".*.tmp")), "no partial file left on the full disk"


# ---- 7. two runs, one output ----------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_is_refused(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    argv = train_argv(toml, files, tmp_path, "--max_train_steps", "2")
    first = launch(argv, pause="train-step:1", seconds=600)
    wait_paused(first, "train-step")
    second = run_script(argv)
    assert second.returncode == 2 and f"another run (process {first.pid}" in second.stderr
    assert str(tmp_path / "lora.lock") in second.stderr
    kill_hard(first)  # its lock stays behind; the next run takes it over
    third = run_script(argv)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of process {first.pid}" in third.stderr
    assert not (tmp_path / "lora.lock").exists(), "released at exit"


# ---- 8. kill -9 inside a save -----------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["file-write:1", "file-fsync:1", "file-rename:1", "state-write:1",
                                   "state-rename:1", "state-cleanup:1"])
def test_kill_9_inside_a_save_loses_nothing(point, two_step_state, tmp_path):
    toml, files, state, reference = two_step_state
    out = tmp_path / "o"
    out.mkdir()
    shutil.copytree(state, out / "lora-state")  # the state and weights of an earlier run to the same output
    shutil.copy(state.parent / "lora-step00000002.safetensors", out / "lora.safetensors")
    before = (out / "lora.safetensors").read_bytes()
    proc = launch(train_argv(toml, files, out, "--max_train_steps", "4", "--resume", str(out / "lora-state"),
                             "--save_state"), pause=point)
    wait_paused(proc, point)
    kill_hard(proc)
    def step_of(folder: Path) -> int:
        return json.loads((folder / STATE_FILE).read_text())["progress"]["global_step"]

    # what the kill left: proof that it came inside the intended window
    if point.startswith("file-"):  # writing the final weights: the previous file is untouched
        assert (out / "lora.safetensors").read_bytes() == before
        assert len(list(out.glob(f".lora.safetensors.{proc.pid}.tmp"))) == 1
    elif point.startswith("state-write"):
        assert (out / "lora-state.tmp" / MARKER).is_file() and step_of(out / "lora-state") == 2
    elif point.startswith("state-rename"):
        assert not (out / "lora-state").exists() and step_of(out / "lora-state.old") == 2
    else:
        assert step_of(out / "lora-state") == 4 and (out / "lora-state.old").is_dir()
    resumed = run("zimage", toml, files, tmp_path / "r", "--max_train_steps", "4", "--resume",
                  str(out / "lora-state"))
    assert resumed.global_step == 4 and same_weights(resumed.path, reference)
    assert not (out / "lora-state.old").exists() and not (out / "lora-state.tmp").exists()


# ---- exact resume under the other training modes ------------------------------------------------------------------
def test_full_fine_tune_resume_with_fused_adafactor_and_block_swap_is_exact(cached, tmp_path):  # noqa: F811
    from test_full_training import ADAFACTOR, assert_same_files, four_layer_zimage, run_full

    toml, files = cached("zimage")
    files = four_layer_zimage(files, tmp_path)
    extra = (*ADAFACTOR, "--fused_backward_pass", "--blocks_to_swap", "1", "--gradient_checkpointing",
             "--gradient_accumulation_steps", "2", "--max_train_steps", "2")
    full = run_full("zimage", toml, files, tmp_path / "full", *extra, "--save_state", "--save_every_n_steps", "1")
    resumed = run_full("zimage", toml, files, tmp_path / "r", *extra, "--resume",
                       str(tmp_path / "full/dit-step00000001-state"))
    assert resumed.losses == full.losses[1:]
    assert_same_files(tmp_path / "full/dit.safetensors", tmp_path / "r/dit.safetensors")


def test_two_process_resume_is_exact(cached, tmp_path):  # noqa: F811
    import sys

    from test_train_network import REPO, _free_port

    toml, files = cached("zimage")

    def launch_two(out: Path, *extra: str) -> None:
        # torchrun starts two processes; ACCELERATE_USE_CPU makes accelerate join them over gloo
        # (``accelerate launch --cpu --num_processes 2`` starts a single process)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), str(REPO / "src/tsumugi/zimage_train_network.py"),
                   *train_argv(toml, files, out, "--max_train_steps", "2", *extra)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"))
        assert result.returncode == 0, result.stderr[-3000:]

    launch_two(tmp_path / "full", "--save_state", "--save_every_n_steps", "1")
    state = tmp_path / "full/lora-step00000001-state"
    assert sorted(p.name for p in state.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
    assert json.loads((state / STATE_FILE).read_text())["processes"] == 2
    launch_two(tmp_path / "r", "--resume", str(state))
    assert same_weights(tmp_path / "full/lora.safetensors", tmp_path / "r/lora.safetensors")
