"""Full fine-tuning (``*_train``) end to end on tiny models: losses, checkpoints, resume, fused backward
pass, block swap, bf16 weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_network import PINNED, REPO, cached  # noqa: F401  (cached is a fixture)

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.cli.train_validation import validate_train_args
from tsumugi.errors import UserError
from tsumugi.models.loader import load_dit
from tsumugi.testing.tiny_models import comfy_state_dict
from tsumugi.train.full_training import train_full

ADAFACTOR = ("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False", "--learning_rate", "1e-3", "--max_grad_norm", "0")


def full_args(arch: str, toml: Path, files: dict[str, Path], out: Path, *extra: str):
    argv = [
        "--dit", str(files["dit"]), "--dataset_config", str(toml), "--learning_rate", "1e-3",
        "--max_train_steps", "3", "--output_dir", str(out), "--output_name", "dit", "--seed", "11",
        "--mixed_precision", "no", *extra,
    ]
    return validate_train_args(parse_train_args(build_train_parser(arch, network=False), argv), environ={})


def run_full(arch, toml, files, out, *extra):
    return train_full(arch, full_args(arch, toml, files, out, *extra))


def four_layer_zimage(files: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Z-Image keeps two main layers resident under block swap: a 4-layer tiny DiT can swap 1 or 2."""
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config
    from tsumugi.testing.tiny_models import build_random, save_component

    dit = build_random("zimage_dit", tiny_zimage_dit_config(n_layers=4))
    return dict(files, dit=save_component(dit, "zimage_dit", "comfy", tmp_path / "dit4.safetensors"))


def assert_same_files(a: Path, b: Path, exact: bool = True) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        if exact:
            assert torch.equal(x[key], y[key]), key
        else:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-7, msg=key)


# Loss of each of 3 AdamW steps (lr 1e-3).
# Regression guards, not references: recorded on this code (CPU, fp32) and pinned; they change whenever the
# per-item random draws change (last: draws keyed by dataset entry). Correctness is proven elsewhere
# (resume exactness, batch N == N accumulated batches, the diffusers parity tests).
PINNED_FULL = {
    "qwen_image": [2.165719985961914, 2.1190919876098633, 1.8983445167541504],
    "zimage": [2.002427101135254, 1.8311445713043213, 2.0374646186828613],
}


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_losses_are_pinned_and_the_first_matches_lora_training(arch, cached, tmp_path):  # noqa: F811
    toml, files = cached(arch)
    result = run_full(arch, toml, files, tmp_path)
    assert len(result.losses) == 3 and result.global_step == 3
    # step 1 sees the untouched DiT, like LoRA training's step 1 (the LoRA starts at zero): same data, same draws
    np.testing.assert_allclose(result.losses[0], PINNED[(arch, "sigma")][0], rtol=2e-4)
    np.testing.assert_allclose(result.losses, PINNED_FULL[arch], rtol=2e-4)


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_checkpoint_is_a_comfyui_file_that_loads_back(arch, cached, tmp_path):  # noqa: F811
    toml, files = cached(arch)
    result = run_full(arch, toml, files, tmp_path, "--max_train_steps", "1", "--save_precision", "bf16")
    assert result.path == tmp_path / "dit.safetensors"
    component = f"{arch}_dit"
    before = load_dit(files["dit"], arch, dtype=torch.float32, device="cpu")
    after = load_dit(result.path, arch, dtype=torch.float32, device="cpu")
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    # the ComfyUI key layout (the same one the input file has), every tensor trained
    assert keys == set(comfy_state_dict(before, component))
    moved = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k].bfloat16().float())]
    assert len(moved) > len(keys) // 2
    assert meta["modelspec.architecture"] == ("Qwen-Image" if arch == "qwen_image" else "Z-Image")
    assert meta["ss_steps"] == "1" and "ss_network_module" not in meta and "ss_network_dim" not in meta


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_resume_continues_exactly(arch, cached, tmp_path):  # noqa: F811
    toml, files = cached(arch)
    full = run_full(arch, toml, files, tmp_path / "full", "--max_train_steps", "4", "--save_state",
                    "--save_every_n_steps", "2")
    state = tmp_path / "full/dit-step00000002-state"
    assert state.is_dir() and (tmp_path / "full/dit-step00000002.safetensors").is_file()
    resumed = run_full(arch, toml, files, tmp_path / "resumed", "--max_train_steps", "4", "--resume", str(state))
    assert resumed.global_step == 4 and resumed.losses == full.losses[2:]
    assert_same_files(tmp_path / "full/dit.safetensors", tmp_path / "resumed/dit.safetensors")


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_fused_backward_pass_equals_adafactor_steps(arch, cached, tmp_path):  # noqa: F811
    toml, files = cached(arch)
    plain = run_full(arch, toml, files, tmp_path / "plain", *ADAFACTOR)
    fused = run_full(arch, toml, files, tmp_path / "fused", *ADAFACTOR, "--fused_backward_pass")
    assert plain.losses == fused.losses
    assert_same_files(tmp_path / "plain/dit.safetensors", tmp_path / "fused/dit.safetensors")


def test_fused_backward_pass_accumulates_gradients(cached, tmp_path):  # noqa: F811
    """Musubi refuses this combination; here each parameter steps once, in the last micro-batch's backward."""
    toml, files = cached("zimage")
    extra = (*ADAFACTOR, "--gradient_accumulation_steps", "2", "--max_train_steps", "2")
    plain = run_full("zimage", toml, files, tmp_path / "plain", *extra)
    fused = run_full("zimage", toml, files, tmp_path / "fused", *extra, "--fused_backward_pass")
    assert plain.losses == fused.losses
    assert_same_files(tmp_path / "plain/dit.safetensors", tmp_path / "fused/dit.safetensors", exact=False)


@pytest.mark.parametrize(("arch", "swap"), [("qwen_image", "1"), ("zimage", "1"), ("zimage", "2")])
@pytest.mark.parametrize("optimizer", ["adamw", "fused"])
def test_block_swap_trains_exactly_like_no_swap(arch, swap, optimizer, cached, tmp_path):  # noqa: F811
    toml, files = cached(arch)
    if arch == "zimage":
        files = four_layer_zimage(files, tmp_path)
    extra = ("--gradient_checkpointing", "--max_train_steps", "2")
    if optimizer == "fused":
        extra += (*ADAFACTOR, "--fused_backward_pass")
    plain = run_full(arch, toml, files, tmp_path / "a", *extra)
    swapped = run_full(arch, toml, files, tmp_path / "b", *extra, "--blocks_to_swap", swap)
    assert plain.losses == swapped.losses
    assert_same_files(tmp_path / "a/dit.safetensors", tmp_path / "b/dit.safetensors")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes the mixed precision of a process at the first Accelerator; a bf16 run needs a new one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_full_bf16_with_stochastic_rounding_trains(cached, tmp_path, fresh_accelerate_state):  # noqa: F811
    toml, files = cached("qwen_image")
    result = run_full("qwen_image", toml, files, tmp_path, *ADAFACTOR, "--fused_backward_pass", "--full_bf16",
                      "--mixed_precision", "bf16", "--max_train_steps", "2")
    assert all(np.isfinite(result.losses))
    with safe_open(str(result.path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # default save dtype = weight dtype
    before = load_dit(files["dit"], "qwen_image", dtype=torch.bfloat16, device="cpu").state_dict()
    after = load_file(result.path)
    assert sum(not torch.equal(after[k], before[k]) for k in after) > len(after) // 2


def test_fp8_flags_are_turned_off_with_a_warning(cached, tmp_path, caplog):  # noqa: F811
    toml, files = cached("zimage")
    result = run_full("zimage", toml, files, tmp_path, "--fp8_base", "--fp8_scaled", "--max_train_steps", "1")
    assert "full fine-tuning" in caplog.text and result.path.is_file()


def test_impossible_combinations_are_refused(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    with pytest.raises(UserError, match="--fused_backward_pass.*AdaFactor"):
        full_args("zimage", toml, files, tmp_path, "--fused_backward_pass")
    with pytest.raises(UserError, match="--full_bf16.*--mixed_precision bf16"):
        full_args("zimage", toml, files, tmp_path, "--full_bf16")
    with pytest.raises(UserError, match="--block_swap_h2d_only"):
        full_args("zimage", toml, files, tmp_path, "--block_swap_h2d_only", "--gradient_checkpointing")


@pytest.mark.parametrize("script", ["qwen_image_train", "zimage_train"])
def test_entry_scripts_run_as_files(script):
    out = subprocess.run([sys.executable, str(REPO / "src/tsumugi" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--fused_backward_pass" in out.stdout and "--network_module" not in out.stdout


def test_samples_during_training_use_the_trained_weights(cached, tmp_path):  # noqa: F811
    """The step-2 sample (rendered from the DiT in training, block swap on) equals what the generate script
    makes from the step-2 checkpoint file with the same prompt, size, steps and seed."""
    from PIL import Image

    from tsumugi.qwen_image_generate_image import main as generate

    toml, files = cached("qwen_image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple --w 32 --h 48 --d 3 --s 2 --l 2.5\n")
    models = ["--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"])]
    run_full("qwen_image", toml, files, tmp_path / "o", "--max_train_steps", "3", "--learning_rate", "1e-2",
             "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first",
             "--save_every_n_steps", "2", "--blocks_to_swap", "1", "--gradient_checkpointing", *models)
    first, trained = (next((tmp_path / "o/sample").glob(f"*_{label}_00_*.png")) for label in ("000000", "000002"))
    sampled = np.asarray(Image.open(trained).convert("RGB")).astype(int)
    assert np.abs(sampled - np.asarray(Image.open(first).convert("RGB")).astype(int)).max() > 0
    assert generate(["--dit", str(tmp_path / "o/dit-step00000002.safetensors"), *models, "--prompt", "a red apple",
                     "--image_size", "48", "32", "--infer_steps", "2", "--seed", "3", "--guidance_scale", "2.5",
                     "--save_path", str(tmp_path / "g"), "--device", "cpu"]) == 0
    generated = np.asarray(Image.open(next((tmp_path / "g").glob("*.png"))).convert("RGB")).astype(int)
    assert np.abs(sampled - generated).max() <= 1


def test_shared_config_file_with_lora_keys_and_metadata_flags(cached, tmp_path, caplog):  # noqa: F811
    """One Musubi ``--config_file`` for LoRA and full runs: LoRA keys warn as unused in full fine-tuning;
    ``--training_comment`` lands in the checkpoint's metadata and ``--no_metadata`` leaves the ss_ keys out."""
    toml, files = cached("zimage")
    shared = tmp_path / "shared.toml"
    shared.write_text('[network]\nnetwork_module = "networks.lora_zimage"\nnetwork_dim = 8\nnetwork_alpha = 4\n'
                      'network_args = ["verbose=true"]\nbase_weights = ["style.safetensors"]\n'
                      '[training]\ntraining_comment = "shared file"\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        result = run_full("zimage", toml, files, tmp_path / "a", "--config_file", str(shared),
                          "--max_train_steps", "1")
    for key in ("network_module", "network_dim", "network_alpha", "network_args", "base_weights"):
        assert f"'{key}' is unused: a LoRA training flag, and zimage_train is full fine-tuning" in caplog.text
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_training_comment"] == "shared file" and "ss_network_dim" not in meta
    # the LoRA script reads the same file (the keys are its flags)
    network_parser = build_train_parser("zimage", network=True)
    lora = parse_train_args(network_parser, ["--config_file", str(shared)])
    assert lora.network_dim == 8 and lora.base_weights == ["style.safetensors"]

    bare = run_full("zimage", toml, files, tmp_path / "b", "--no_metadata", "--training_comment", "x",
                    "--max_train_steps", "1")
    with safe_open(str(bare.path), "pt") as f:
        meta = f.metadata()
    assert "ss_training_comment" not in meta and "ss_learning_rate" not in meta
    assert meta["modelspec.architecture"] == "Z-Image"


def test_unknown_config_key_is_still_an_error_in_full_fine_tuning(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dimm = 8\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown key 'network_dimm'"):
        parse_train_args(build_train_parser("zimage", network=False), ["--config_file", str(bad)])
