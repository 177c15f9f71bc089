"""Reading LoRA files in the layouts the community uses, into one neutral form.

Accepted layouts (detected per file from the keys):

- Musubi / kohya: ``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``;
- diffusers / PEFT and ComfyUI-style: ``<prefix>.<dotted.module.path>.lora_A.weight`` / ``.lora_B.weight``
  (optional ``.alpha``), with ``<prefix>`` one of ``transformer``, ``diffusion_model``, or none.

Each module's update is ``delta_W = (alpha / rank) * up @ down``; without an alpha the scale is 1.
Module paths are resolved against the names of the model's Linear layers, so underscores inside names
(``to_q``, ``feed_forward``) are recovered exactly instead of guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.errors import UserError

_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")
_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")


@dataclass
class LoraModule:
    """One adapted module: ``name`` as written in the file (prefix removed), low-rank factors, alpha."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        return (self.up.to(dtype) @ self.down.to(dtype)) * scale


def lora_module_names(keys) -> list[str]:
    """Module names (file prefix removed) of the LoRA factor keys among ``keys``, in first-seen order."""
    names: dict[str, None] = {}
    for key in keys:
        name = next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
        hit = next((s for s in (*_DOWN_SUFFIXES, *_UP_SUFFIXES) if name.endswith(s)), None)
        if hit:
            names[name[: -len(hit)]] = None
    return list(names)


def read_lora_file(path: str | Path, flag: str = "--lora_weight") -> list[LoraModule]:
    """Read every LoRA module of a safetensors file; other tensor types (LoHa/LoKr) are rejected clearly."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise UserError(f"{flag}: {path} is not a readable safetensors file ({exc})") from None

    if any(".hada_" in k or ".lokr_" in k for k in tensors):
        raise UserError(f"{flag}: {path} is a LoHa/LoKr file; tsumugi can merge plain LoRA files only for now")

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        for part, suffixes in (("down", _DOWN_SUFFIXES), ("up", _UP_SUFFIXES), ("alpha", (".alpha",))):
            hit = next((s for s in suffixes if name.endswith(s)), None)
            if hit:
                modules.setdefault(name[: -len(hit)], {})[part] = tensor
                break
    result = []
    for name, parts in sorted(modules.items()):
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise UserError(f"{flag}: {path}: module {name} has no lora_{missing} weight")
        alpha = parts.get("alpha")
        result.append(LoraModule(name, parts["down"], parts["up"], None if alpha is None else float(alpha)))
    if not result:
        raise UserError(f"{flag}: {path} contains no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys)")
    return result
