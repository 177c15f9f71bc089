"""Merging LoRA files into a loaded DiT for inference: ``W <- W + m * delta_W`` in fp32."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from tsumugi.errors import UserError
from tsumugi.models.stream import LoadStep
from tsumugi.networks.lora_files import LoraModule, read_lora_file

logger = logging.getLogger(__name__)

# Fused layouts some files use for Z-Image (ComfyUI-native): one name standing for several Linears,
# the update's rows split between them in order.
_FUSED_ALIASES: dict[str, tuple[str, ...]] = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention_qkv": ("attention_to_q", "attention_to_k", "attention_to_v"),
}
_RENAMES: dict[str, str] = {"attention.out": "attention.to_out.0", "attention_out": "attention_to_out_0"}


def _linear_index(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Both spellings of every Linear: dotted path and kohya's underscore form (``lora_unet_`` removed)."""
    index: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            index[name] = module
            index[name.replace(".", "_")] = module
    return index


def _targets(name: str, index: dict[str, torch.nn.Linear]) -> list[torch.nn.Linear] | None:
    name = name.removeprefix("lora_unet_")
    if name in index:
        return [index[name]]
    for fused, parts in _FUSED_ALIASES.items():
        if name.endswith(fused):
            base = name[: -len(fused)]
            if all(base + p in index for p in parts):
                return [index[base + p] for p in parts]
    for old, new in _RENAMES.items():
        if name.endswith(old) and name[: -len(old)] + new in index:
            return [index[name[: -len(old)] + new]]
    return None


def merge_lora_modules(
    model: torch.nn.Module,
    modules: list[LoraModule],
    multiplier: float,
    *,
    source: str = "LoRA",
    include: str | None = None,
    exclude: str | None = None,
) -> int:
    """Merge ``modules`` into ``model``'s Linear weights; returns the number of weights changed.

    ``include``/``exclude`` are regexes searched in the module names of the file: a module is merged
    when it matches ``include`` (if given) and does not match ``exclude`` (if given). Names that match no layer of the model make the merge fail: a LoRA for another
    model must not load silently half-applied.
    """
    index = _linear_index(model)
    unmatched = []
    changed = 0
    for module in modules:
        if exclude and re.search(exclude, module.name):
            continue
        if include and not re.search(include, module.name):
            continue
        targets = _targets(module.name, index)
        if targets is None:
            unmatched.append(module.name)
            continue
        delta = module.delta(torch.float32) * multiplier
        rows = [t.weight.shape[0] for t in targets]
        if delta.shape != (sum(rows), targets[0].weight.shape[1]):
            raise UserError(
                f"{source}: module {module.name} has shape {tuple(delta.shape)}, "
                f"the model's layer expects {(sum(rows), targets[0].weight.shape[1])}: LoRA for another model?"
            )
        for target, part in zip(targets, torch.split(delta, rows, dim=0)):
            weight = target.weight
            if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or hasattr(target, "scale_weight"):
                raise UserError(f"{source}: the DiT is already in fp8; LoRAs must be merged before fp8 quantization")
            merged = weight.data.float() + part.to(weight.device)
            weight.data.copy_(merged.to(weight.dtype))
            changed += 1
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise UserError(f"{source}: {len(unmatched)} LoRA modules match no layer of this DiT ({shown})")
    return changed


class LoraMergeStep(LoadStep):
    """:func:`merge_lora_files` while the DiT streams in (``load_dit(..., steps=[...])``).

    The files are read and their names and shapes checked against the meta-device DiT in ``prepare``
    (before any DiT data is read; same errors as :func:`merge_lora_modules`); ``apply`` merges every
    update into its target weight as the weight arrives, file by file in order, each with the same
    fp32 arithmetic and rounding back to the weight's dtype as the merge into a loaded DiT, so the
    result is bit-identical to it. ``flag`` names the option in messages (``--lora_weight``,
    ``--base_weights``).
    """

    def __init__(
        self,
        paths: list[str],
        multipliers: list[float] | None,
        include_patterns: list[str] | None = None,
        exclude_patterns: list[str] | None = None,
        *,
        flag: str = "--lora_weight",
        multiplier_flag: str = "--lora_multiplier",
    ) -> None:
        multipliers = list(multipliers or [])
        if len(multipliers) > len(paths):
            raise UserError(f"{multiplier_flag}: {len(multipliers)} values given for {len(paths)} {flag} files")
        self.flag = flag
        self.files = []
        for i, path in enumerate(paths):
            self.files.append((
                path,
                multipliers[i] if i < len(multipliers) else 1.0,
                include_patterns[i] if include_patterns and i < len(include_patterns) else None,
                exclude_patterns[i] if exclude_patterns and i < len(exclude_patterns) else None,
                read_lora_file(path, flag),
            ))
        # weight key -> [(module, multiplier, first row, last row)] in merge order
        self._plan: dict[str, list[tuple[LoraModule, float, int, int]]] = {}
        self._uses: dict[int, int] = {}
        self._deltas: dict[int, torch.Tensor] = {}
        self._counts: list[int] = []

    def prepare(self, model: torch.nn.Module) -> None:
        index = _linear_index(model)
        names = {id(m): name for name, m in model.named_modules()}
        for path, multiplier, include, exclude, modules in self.files:
            source = f"{self.flag} {Path(path).name}"
            unmatched, count = [], 0
            for module in modules:
                if (exclude and re.search(exclude, module.name)) or (include and not re.search(include, module.name)):
                    continue
                targets = _targets(module.name, index)
                if targets is None:
                    unmatched.append(module.name)
                    continue
                rows = [t.weight.shape[0] for t in targets]
                shape = (int(module.up.shape[0]), int(module.down.shape[1]))
                if shape != (sum(rows), targets[0].weight.shape[1]):
                    raise UserError(
                        f"{source}: module {module.name} has shape {shape}, the model's layer expects "
                        f"{(sum(rows), targets[0].weight.shape[1])}: LoRA for another model?"
                    )
                start = 0
                for target, n in zip(targets, rows):
                    self._plan.setdefault(f"{names[id(target)]}.weight", []).append(
                        (module, multiplier, start, start + n))
                    self._uses[id(module)] = self._uses.get(id(module), 0) + 1
                    start += n
                    count += 1
            if unmatched:
                shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
                raise UserError(f"{source}: {len(unmatched)} LoRA modules match no layer of this DiT ({shown})")
            self._counts.append(count)

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        for module, multiplier, start, stop in self._plan.get(key, ()):
            delta = self._deltas.get(id(module))
            if delta is None:
                delta = self._deltas[id(module)] = module.delta(torch.float32) * multiplier
            part = delta[start:stop]
            self._uses[id(module)] -= 1
            if not self._uses[id(module)]:
                del self._deltas[id(module)]
            tensor = (tensor.float() + part.to(tensor.device)).to(tensor.dtype)
        return {key: tensor}

    def finish(self, model: torch.nn.Module) -> None:
        for (path, multiplier, *_), count in zip(self.files, self._counts):
            logger.info("merged %s (x%.3g): %d weights", path, multiplier, count)
        self.files = []  # the LoRA tensors are no longer needed


def merge_lora_files(
    model: torch.nn.Module,
    paths: list[str],
    multipliers: list[float] | None,
    include_patterns: list[str] | None = None,
    exclude_patterns: list[str] | None = None,
) -> None:
    """Merge several files, the i-th multiplier/pattern going with the i-th file (missing -> 1.0/none)."""
    multipliers = list(multipliers or [])
    if len(multipliers) > len(paths):
        raise UserError(f"--lora_multiplier: {len(multipliers)} values given for {len(paths)} --lora_weight files")
    for i, path in enumerate(paths):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        include = include_patterns[i] if include_patterns and i < len(include_patterns) else None
        exclude = exclude_patterns[i] if exclude_patterns and i < len(exclude_patterns) else None
        modules = read_lora_file(path)
        count = merge_lora_modules(
            model, modules, multiplier, source=f"--lora_weight {Path(path).name}", include=include, exclude=exclude
        )
        logger.info("merged %s (x%.3g): %d weights", path, multiplier, count)
