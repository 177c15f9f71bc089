"""convert_lora (layouts, names, fused q/k/v, diffusers loading) and merge_lora (offline merge into a DiT)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_helpers import QWEN, ZIMAGE
from safetensors import safe_open
from safetensors.torch import save_file

from tsumugi import convert_lora, merge_lora
from tsumugi.models.components import kind_for
from tsumugi.models.detect import detect
from tsumugi.models.loader import load_dit, load_info
from tsumugi.networks.lora_convert import module_names, split_fused
from tsumugi.networks.lora_files import LoraModule, read_lora_file
from tsumugi.networks.lora_merge import merge_lora_files
from tsumugi.networks.lora_save import model_hashes
from tsumugi.testing.tiny_models import build_tiny, save_component

ARCHS = ("qwen_image", "zimage")
SRC = Path(__file__).resolve().parents[2] / "src"


# ---- helpers ---------------------------------------------------------------------------------------
def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def block_linears(arch: str) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the transformer blocks (refiners and modulation included) of the tiny DiT."""
    model = build_tiny(kind_for("dit", arch).name)
    blocks = ("transformer_blocks.", "layers.", "noise_refiner.", "context_refiner.")
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)}


def random_musubi_lora(arch: str, path: Path, seed: int = 0, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """A Musubi-layout LoRA on every block Linear, ranks 2..5 and alphas 0.5..8 (some missing)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, linear) in enumerate(sorted(block_linears(arch).items())):
        rank = 2 + i % 4
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.1
        if i % 7 != 3:
            sd[f"{key}.alpha"] = torch.tensor([0.5, 1.0, 3.0, 8.0][i % 4])
    save_file(sd, str(path), metadata)
    return sd


def deltas(path) -> dict[str, torch.Tensor]:
    out = {}
    for m in read_lora_file(path):
        name = m.name.removeprefix("lora_unet_").replace(".", "_")
        out[name] = m.delta(torch.float64)
    return out


def run(main, *args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Tiny DiTs (the weights ``write_tiny_set`` writes) in the ComfyUI, prefixed and diffusers layouts."""
    root = tmp_path_factory.mktemp("dits")
    out = {}
    for arch in ARCHS:
        kind = kind_for("dit", arch).name
        model = build_tiny(kind, 0)
        for fmt in ("comfy", "comfy_prefixed", "diffusers"):
            name = f"{arch}_{fmt}" if fmt == "diffusers" else f"{arch}_{fmt}.safetensors"
            out[(arch, fmt)] = save_component(model, kind, fmt, root / name)
    return out


def diffusers_pipeline(arch: str, dit_folder: Path):
    """The pipeline of ``tsumugi.testing.reference.reference_pipeline`` with only its transformer loaded
    (the LoRA loader touches nothing else)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    if arch == "qwen_image":
        from tsumugi.arch.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG as scheduler_config

        cls, transformer_cls = QwenImagePipeline, QwenImageTransformer2DModel
    else:
        from tsumugi.arch.zimage import ZIMAGE_SCHEDULER_CONFIG as scheduler_config

        cls, transformer_cls = ZImagePipeline, ZImageTransformer2DModel
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer_cls.from_pretrained(dit_folder),
    )


# ---- module names ----------------------------------------------------------------------------------
def test_name_tables_come_from_the_model_classes():
    qwen, zimage = module_names("qwen_image"), module_names("zimage")
    assert qwen.resolve("lora_unet_transformer_blocks_59_txt_mlp_net_0_proj") == ("transformer_blocks.59.txt_mlp.net.0.proj",)
    assert qwen.resolve("lora_unet_transformer_blocks_7_img_mod_1") == ("transformer_blocks.7.img_mod.1",)
    assert qwen.resolve("lora_unet_transformer_blocks_0_attn_add_q_proj") == ("transformer_blocks.0.attn.add_q_proj",)
    assert qwen.resolve("lora_unet_time_text_embed_timestep_embedder_linear_1") == (
        "time_text_embed.timestep_embedder.linear_1",
    )
    assert qwen.resolve("lora_unet_layers_0_attention_to_q") is None
    assert zimage.resolve("lora_unet_layers_29_feed_forward_w2") == ("layers.29.feed_forward.w2",)
    assert zimage.resolve("lora_unet_noise_refiner_1_adaLN_modulation_0") == ("noise_refiner.1.adaLN_modulation.0",)
    assert zimage.resolve("layers.3.attention.out") == ("layers.3.attention.to_out.0",)
    assert zimage.resolve("lora_unet_x_embedder") == ("all_x_embedder.2-1",)
    assert zimage.resolve("lora_unet_layers_4_attention_qkv") == tuple(
        f"layers.4.attention.to_{p}" for p in "qkv"
    )
    assert zimage.resolve("lora_unet_transformer_blocks_0_attn_to_q") is None


# ---- convert_lora ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_keeps_every_delta(arch, tmp_path):
    src = tmp_path / "musubi.safetensors"
    meta = {"ss_network_dim": "4", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    original = random_musubi_lora(arch, src, metadata=meta)
    other, back = tmp_path / "other.safetensors", tmp_path / "back.safetensors"
    assert run(convert_lora.main, "--input", src, "--output", other, "--target", "other") == 0
    assert run(convert_lora.main, "--input", other, "--output", back, "--target", "default") == 0

    tensors, stored = read(other)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * len(block_linears(arch))
    assert stored["ss_network_dim"] == "4"
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == model_hashes(tensors, stored)

    back_tensors, _ = read(back)
    assert {k for k in back_tensors if not k.endswith(".alpha")} == {k for k in original if not k.endswith(".alpha")}
    assert all(k.replace("lora_down.weight", "alpha") in back_tensors for k in back_tensors if "lora_down" in k)
    want, got = deltas(src), deltas(back)
    assert want.keys() == got.keys() == deltas(other).keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_alpha_prefix_and_adapter_name(arch, tmp_path):
    src = tmp_path / "musubi.safetensors"
    original = random_musubi_lora(arch, src, seed=1)
    other = tmp_path / "other.safetensors"
    assert run(convert_lora.main, "--input", src, "--output", other, "--target", "other", "--keep_alpha",
               "--diffusers_prefix", "transformer") == 0
    tensors, _ = read(other)
    for key, value in original.items():
        path = key.split(".")[0].removeprefix("lora_unet_")
        dotted = module_names(arch).resolve(path)[0]
        new = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
        assert torch.equal(tensors[f"transformer.{dotted}.{new[key.split('.', 1)[1]]}"].float(), value.float())
    back = tmp_path / "back.safetensors"
    assert run(convert_lora.main, "--input", other, "--output", back, "--target", "default") == 0
    back_tensors, _ = read(back)
    for key, value in original.items():
        assert torch.equal(back_tensors[key], value.float())  # alpha kept, not reset to the rank

    bare = tmp_path / "bare.safetensors"
    assert run(convert_lora.main, "--input", src, "--output", bare, "--target", "other", "--diffusers_prefix", "-",
               "--diffusers_adapter_name", "default") == 0
    keys = read(bare)[0].keys()
    assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in keys)
    assert any(k.startswith(("transformer_blocks.", "layers.")) for k in keys)


def _fuse_qkv(sd: dict[str, torch.Tensor], dense_up: bool) -> dict[str, torch.Tensor]:
    """ComfyUI-native Z-Image layout as Musubi's convert_z_image_lora_to_comfy writes it (test oracle)."""
    out = {}
    blocks = sorted({k.split("_attention_to_q")[0] for k in sd if "_attention_to_q." in k})
    g = torch.Generator().manual_seed(5)
    for block in blocks:
        names = [f"{block}_attention_to_{p}" for p in "qkv"]
        downs = [sd.pop(f"{n}.lora_down.weight") for n in names]
        ups = [sd.pop(f"{n}.lora_up.weight") for n in names]
        alphas = [sd.pop(f"{n}.alpha", None) for n in names]
        up = torch.block_diag(*ups)
        if dense_up:
            up = up + 0.01 * torch.randn(up.shape, generator=g)
        out[f"{block}_attention_qkv.lora_down.weight"] = torch.cat(downs)
        out[f"{block}_attention_qkv.lora_up.weight"] = up
        out[f"{block}_attention_qkv.alpha"] = alphas[0] * 3
    for key, value in sd.items():
        out[key.replace("_attention_to_out_0", "_attention_out")] = value
    return out


def _same_rank_per_projection(sd):
    """Give q/k/v of every block the same rank and alpha, as a fusable Musubi LoRA has."""
    for key in [k for k in sd if "_attention_to_q." in k]:
        for p in "kv":
            other = key.replace("_to_q.", f"_to_{p}.")
            if key.endswith("lora_down.weight"):
                sd[other] = sd[other][:1].repeat(sd[key].shape[0], 1)
            elif key.endswith("lora_up.weight"):
                sd[other] = sd[other][:, :1].repeat(1, sd[key].shape[1])
            else:
                sd[other] = sd[key].clone()
        if key.endswith("lora_down.weight") and key.replace("lora_down.weight", "alpha") not in sd:
            sd[key.replace("lora_down.weight", "alpha")] = torch.tensor(2.0)
            for p in "kv":
                sd[key.replace("_to_q.lora_down.weight", f"_to_{p}.alpha")] = torch.tensor(2.0)


def test_fused_qkv_made_by_fusion_splits_back_exactly(tmp_path):
    sd = random_musubi_lora("zimage", tmp_path / "unused.safetensors")
    _same_rank_per_projection(sd)
    save_file(sd, str(tmp_path / "musubi.safetensors"))
    fused = _fuse_qkv(dict(sd), dense_up=False)
    save_file(fused, str(tmp_path / "comfy.safetensors"))
    for target in ("default", "other"):
        out = tmp_path / f"{target}.safetensors"
        assert run(convert_lora.main, "--input", tmp_path / "comfy.safetensors", "--output", out,
                   "--target", target, "--keep_alpha") == 0
    back, _ = read(tmp_path / "default.safetensors")
    for key in back.keys() - sd.keys():  # a missing alpha is written as the rank
        assert key.endswith(".alpha") and float(back[key]) == sd[key.replace("alpha", "lora_down.weight")].shape[0]
    assert back.keys() >= sd.keys()
    for key, value in sd.items():
        assert torch.equal(back[key], value.float()), key


def test_fused_qkv_not_from_fusion_keeps_the_delta(tmp_path):
    sd = random_musubi_lora("zimage", tmp_path / "unused.safetensors")
    _same_rank_per_projection(sd)
    fused = _fuse_qkv(dict(sd), dense_up=True)
    # diffusers/ComfyUI spelling of the native names, as a LoRA trained on the ComfyUI model would have
    renamed = {}
    for key, value in fused.items():
        name, _, suffix = key.partition(".")
        dotted = module_names("zimage").resolve(name)
        if len(dotted) == 3:
            native = dotted[0].removesuffix(".to_q") + ".qkv"
        elif dotted[0].endswith(".attention.to_out.0"):
            native = dotted[0].removesuffix(".to_out.0") + ".out"
        else:
            native = dotted[0]
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        renamed[f"diffusion_model.{native}.{suffix}"] = value
    assert any(".attention.qkv.lora_A" in k for k in renamed)
    src = tmp_path / "fused.safetensors"
    save_file(renamed, str(src))
    out = tmp_path / "split.safetensors"
    assert run(convert_lora.main, "--input", src, "--output", out, "--target", "default") == 0
    got = {m.name: m for m in read_lora_file(out)}
    for m in read_lora_file(src):
        if not m.name.endswith("attention.qkv"):
            continue
        block = m.name.removesuffix(".attention.qkv").replace(".", "_")
        parts = [got[f"lora_unet_{block}_attention_to_{p}"] for p in "qkv"]
        assert all(p.rank == m.rank for p in parts)  # shared down, full rank
        torch.testing.assert_close(torch.cat([p.delta() for p in parts]), m.delta(), rtol=0, atol=1e-6)


def test_split_fused_uses_query_width_for_rows():
    down, up = torch.randn(6, 8), torch.zeros(16, 6)  # GQA-like: q 8 rows, k/v 4 rows each
    up[:8, :2], up[8:12, 2:4], up[12:, 4:] = 1.0, 2.0, 3.0
    pieces, exact = split_fused(LoraModule("x.qkv", down, up, 6.0), ("q", "k", "v"))
    assert exact and [p.up.shape for p in pieces] == [(8, 2), (4, 2), (4, 2)]
    assert [p.alpha for p in pieces] == [2.0, 2.0, 2.0]
    torch.testing.assert_close(torch.cat([p.delta() for p in pieces]), LoraModule("x", down, up, 6.0).delta())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("keep_alpha", [False, True], ids=["folded", "keep_alpha"])
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_file_loads_in_diffusers(arch, keep_alpha, dits, tmp_path):
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    src = tmp_path / "musubi.safetensors"
    random_musubi_lora(arch, src, seed=2)
    other = tmp_path / "other.safetensors"
    args = ["--input", src, "--output", other, "--target", "other"] + (["--keep_alpha"] if keep_alpha else [])
    assert run(convert_lora.main, *args) == 0

    folder = dits[(arch, "diffusers")]
    pipe = diffusers_pipeline(arch, folder)
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        converted = type(pipe).lora_state_dict(str(other))
        pipe.load_lora_weights(str(other), adapter_name="converted")
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "missing" in m.lower()], records.messages
    transformer = pipe.transformer
    injected = {n for n, mod in transformer.named_modules() if isinstance(mod, LoraLayer)}
    assert injected == set(block_linears(arch))
    loaded = set(get_peft_model_state_dict(transformer, adapter_name="converted"))
    assert {k.removeprefix("transformer.") for k in converted} == loaded

    want = load_dit(folder, arch, dtype=torch.float32)
    merge_lora_files(want, [str(src)], [1.0])
    case = QWEN if arch == "qwen_image" else ZIMAGE
    inputs = case.inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(case.run(transformer, inputs), case.run(want, inputs), rtol=1e-4, atol=1e-4)


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    line = err[-1]
    assert line.startswith("error: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in line, line
    return line


def test_convert_errors(dits, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    dit = dits[("zimage", "comfy")]
    _one_line_error(capsys, run(convert_lora.main, "--input", dit, "--output", out, "--target", "other"),
                    str(dit), "not a LoRA file")
    missing = tmp_path / "nope.safetensors"
    _one_line_error(capsys, run(convert_lora.main, "--input", missing, "--output", out, "--target", "other"),
                    str(missing), "does not exist")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _one_line_error(capsys, run(convert_lora.main, "--input", junk, "--output", out, "--target", "default"), str(junk))
    hunyuan = tmp_path / "hunyuan.safetensors"
    save_file({f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_{p}.weight": torch.zeros(2, 2)
               for i in range(3) for p in ("down", "up")}, str(hunyuan))
    _one_line_error(capsys, run(convert_lora.main, "--input", hunyuan, "--output", out, "--target", "other"),
                    str(hunyuan), "double_blocks")
    zlora = tmp_path / "z.safetensors"
    random_musubi_lora("zimage", zlora)
    line = _one_line_error(
        capsys,
        run(convert_lora.main, "--input", zlora, "--output", out, "--target", "other", "--architecture", "qwen_image"),
        str(zlora), "match no Qwen-Image module name",
    )
    assert "lora_unet_" in line
    _one_line_error(capsys, run(convert_lora.main, "--input", zlora, "--output", out, "--target", "sideways"),
                    "--target")
    assert not out.exists()


# ---- merge_lora ------------------------------------------------------------------------------------
def _assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for key in want_sd:
        assert torch.equal(got_sd[key], want_sd[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_in_memory_merge(arch, dits, tmp_path):
    loras = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    random_musubi_lora(arch, loras[0], seed=3)
    random_musubi_lora(arch, tmp_path / "b_musubi.safetensors", seed=4)
    assert run(convert_lora.main, "--input", tmp_path / "b_musubi.safetensors", "--output", loras[1],
               "--target", "other") == 0
    dit = dits[(arch, "comfy")]
    out = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, "--dit", dit, "--lora_weight", *loras, "--lora_multiplier", "0.7",
               "--save_merged_model", out, "--device", "cpu") == 0

    want = load_dit(dit, arch, dtype=torch.float32)
    merge_lora_files(want, [str(p) for p in loras], [0.7])
    _assert_same_state(load_dit(out, arch, dtype=torch.float32), want)
    base = load_dit(dit, arch, dtype=torch.float32).state_dict()
    changed = [k for k, v in want.state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == len(block_linears(arch))  # every adapted weight, nothing else
    got_keys, meta = read(out)
    assert got_keys.keys() == read(dit)[0].keys()  # same (ComfyUI) key layout as the input
    assert all(t.dtype == torch.float32 for t in got_keys.values())
    assert '"multiplier": 0.7' in meta["tsumugi.merged_loras"]


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_diffusers_folder_writes_comfy_layout(arch, dits, tmp_path):
    lora = tmp_path / "lora.safetensors"
    random_musubi_lora(arch, lora, seed=5)
    folder = dits[(arch, "diffusers")]
    out = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, "--dit", folder, "--lora_weight", lora, "--save_merged_model", out,
               "--save_dtype", "bf16", "--dit_in_channels", "16") == 0
    det = detect(out, "dit")
    with det.source:
        assert det.layout == "comfy" and det.kind == kind_for("dit", arch).name
    tensors, _ = read(out)
    assert tensors.keys() == read(dits[(arch, "comfy")])[0].keys()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    want = load_dit(folder, arch, dtype=torch.bfloat16)
    merge_lora_files(want, [str(lora)], None)
    _assert_same_state(load_dit(out, arch, dtype=torch.bfloat16), want)


def test_merge_keeps_prefix_and_edit_2511_marker(dits, tmp_path):
    tensors, meta = read(dits[("qwen_image", "comfy_prefixed")])
    tensors["model.diffusion_model.__index_timestep_zero__"] = torch.zeros(0)
    tensors["vae.some.weight"] = torch.ones(3, dtype=torch.float16)  # another component of an all-in-one file
    dit = tmp_path / "all_in_one.safetensors"
    save_file(tensors, str(dit), meta)
    lora = tmp_path / "lora.safetensors"
    random_musubi_lora("qwen_image", lora, seed=6)
    out = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, "--dit", dit, "--lora_weight", lora, "--lora_multiplier", "-1.5",
               "--save_merged_model", out, "--architecture", "qwen_image") == 0
    got, _ = read(out)
    assert got.keys() == tensors.keys()
    assert got["vae.some.weight"].dtype == torch.float16
    model = load_dit(out, "qwen_image", dtype=torch.float32)
    assert load_info(model)["edit_2511_marker"]
    want = load_dit(dit, "qwen_image", dtype=torch.float32)
    merge_lora_files(want, [str(lora)], [-1.5])
    _assert_same_state(model, want)


def test_merge_errors(dits, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    qwen_dit = dits[("qwen_image", "comfy")]
    zlora = tmp_path / "z.safetensors"
    random_musubi_lora("zimage", zlora)
    _one_line_error(capsys, run(merge_lora.main, "--dit", qwen_dit, "--lora_weight", zlora,
                                "--save_merged_model", out), str(zlora), "Z-Image")
    missing = tmp_path / "missing.safetensors"
    _one_line_error(capsys, run(merge_lora.main, "--dit", qwen_dit, "--lora_weight", missing,
                                "--save_merged_model", out), str(missing))
    _one_line_error(capsys, run(merge_lora.main, "--dit", zlora, "--lora_weight", zlora,
                                "--save_merged_model", out), str(zlora), "expected a Qwen-Image or Z-Image DiT")
    _one_line_error(capsys, run(merge_lora.main, "--dit", qwen_dit, "--lora_weight", zlora, "--lora_multiplier",
                                "1", "2", "--save_merged_model", out), "--lora_multiplier")
    _one_line_error(capsys, run(merge_lora.main, "--dit", qwen_dit, "--architecture", "zimage",
                                "--save_merged_model", out), str(qwen_dit), "Qwen-Image DiT")
    _one_line_error(capsys, run(merge_lora.main, "--dit", qwen_dit, "--save_merged_model", qwen_dit), str(qwen_dit))
    assert not out.exists()


def test_script_runs_as_a_file():
    done = subprocess.run(
        [sys.executable, str(SRC / "tsumugi" / "merge_lora.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--dit_in_channels" in done.stdout, done.stderr
