"""Model and LoRA files a run opens later, checked from their headers now.

A truncated or wrong file given for a sample VAE or a LoRA is otherwise found when it is first opened:
after the first training steps, or after every prompt has been sampled. Headers are small; no tensor
data is read here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tsumugi.errors import UserError
from tsumugi.models.components import KINDS, kind_for
from tsumugi.models.safetensors_io import TensorInfo, read_header
from tsumugi.preflight.paths import require_file, require_file_or_folder

_FAMILY = {"qwen_image": "Qwen-Image", "zimage": "Z-Image"}


def check_model(path: str | os.PathLike[str], arch: str, role: str, flag: str) -> dict[str, TensorInfo]:
    """Header check of the ``role`` ("dit", "vae", "text_encoder") model of ``arch`` at ``path``.

    Every file of a shard set is read (a truncated shard is found); returns the component's tensor
    infos by component key (for size estimates). Raises UserError naming ``flag`` for missing,
    non-regular, truncated or corrupt files and for a component of another kind or family.
    """
    from tsumugi.models.detect import detect

    kind = kind_for(role, arch)
    p = require_file_or_folder(path, flag, "safetensors file")
    det = detect(p, kind.name, flag=flag)
    with det.source:
        if det.kind != kind.name:
            raise UserError(f"{flag}: {det.path} is {det.describe()}, expected {kind.with_article}")
        if det.fp8_scaled:
            raise UserError(f"{flag}: {det.path} is an fp8_scaled checkpoint (pre-quantized weights with scale "
                            "tensors); loading those is not supported yet: use the bf16 (or fp16) file")
        return {key: det.source.info(file_key) for key, file_key in det.keymap.items()}


def check_any_dit(path: str | os.PathLike[str], flag: str) -> tuple[str, dict[str, TensorInfo]]:
    """(architecture, tensor infos) of a DiT of either family at ``path``."""
    from tsumugi.models.detect import detect

    p = require_file_or_folder(path, flag, "safetensors file")
    det = detect(p, "dit", flag=flag)
    with det.source:
        if det.kind is None or KINDS[det.kind].role != "dit":
            raise UserError(f"{flag}: {det.path} is {det.describe()}, expected a Qwen-Image or Z-Image DiT")
        return KINDS[det.kind].arch, {key: det.source.info(file_key) for key, file_key in det.keymap.items()}


def check_lora(path: str | os.PathLike[str], arch: str, flag: str) -> dict[str, TensorInfo]:
    """Header check of a LoRA file for ``arch``: a plain LoRA whose every module names a module of the
    family's DiT. A LoRA of the other family is named as such. Returns the tensor infos."""
    from tsumugi.networks.lora_convert import detect_architecture, module_names
    from tsumugi.networks.lora_files import lora_module_names

    p = require_file(path, flag, "LoRA .safetensors file")
    try:
        infos, metadata = read_header(p)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None
    if any(".hada_" in k or ".lokr_" in k for k in infos):
        raise UserError(f"{flag}: {p} is a LoHa/LoKr file; only plain LoRA files are supported")
    names = lora_module_names(infos)
    if not names:
        sample = ", ".join(sorted(infos)[:3]) or "no tensors"
        raise UserError(f"{flag}: {p} is not a LoRA file (no lora_down/lora_up or lora_A/lora_B keys; "
                        f"found {sample}); expected a {_FAMILY[arch]} LoRA")
    table = module_names(arch)
    unknown = [n for n in names if table.resolve(n) is None]
    if unknown:
        found = detect_architecture(names, metadata)
        what = f"a {_FAMILY[found]} LoRA" if found not in (None, arch) else "a LoRA for another model"
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise UserError(f"{flag}: {p} looks like {what}: {len(unknown)} of {len(names)} modules match no "
                        f"{_FAMILY[arch]} module ({shown}); expected a {_FAMILY[arch]} LoRA")
    return infos


def lora_rank(infos: Mapping[str, TensorInfo]) -> int | None:
    """The largest rank among the down factors of a LoRA header."""
    ranks = [info.shape[0] for key, info in infos.items()
             if key.endswith((".lora_down.weight", ".lora_A.weight")) and info.shape]
    return max(ranks) if ranks else None


__all__ = ["check_any_dit", "check_lora", "check_model", "lora_rank"]
