"""Converting LoRA files between key layouts, without loading a model.

Layouts (``<path>`` = dotted diffusers module path such as ``transformer_blocks.3.attn.to_q``):

``default`` (Musubi / kohya)
    ``lora_unet_<path with _>.lora_down.weight`` ``(r, in)``, ``.lora_up.weight`` ``(out, r)``, ``.alpha``.
``other`` (diffusers / ComfyUI)
    ``<prefix>.<path>.lora_A.weight`` / ``.lora_B.weight`` (``prefix`` default ``diffusion_model``, none
    possible). Alpha is folded into both factors (each multiplied by ``sqrt(alpha / r)``, the sign going
    to ``lora_B``), as Musubi's ``convert_lora --target other`` does; with ``keep_alpha`` the factors are
    kept and ``<prefix>.<path>.alpha`` written (ComfyUI and diffusers read it too).

Any layout :func:`tsumugi.networks.lora_files.read_lora_file` reads is accepted as input, including the
ComfyUI-native Z-Image names (fused ``attention.qkv``, ``attention.out``, ``x_embedder``,
``final_layer``), which are written under the diffusers names.

Restoring dots from kohya's underscores needs the module names: they come from the diffusers model
classes, built on the meta device with the released configs (:func:`module_names`), not from guessing
which underscores are separators. Block indices are free (``transformer_blocks.N``, ``layers.N``,
``noise_refiner.N``, ``context_refiner.N``, ``siglip_refiner.N``), so pruned or deeper variants resolve too.
The ComfyUI-native aliases come from the model's own key converter
(:mod:`tsumugi.models.convert_zimage_dit`), run on names only.

Fused Z-Image ``attention.qkv`` LoRAs are split into ``to_q``/``to_k``/``to_v``:

* made by fusion (Musubi's ``convert_z_image_lora_to_comfy``: ``down = cat(Aq, Ak, Av)`` of rank 3r,
  ``up`` block-diagonal, alpha x 3): the up matrix is exactly block-diagonal, so each projection gets back
  its own rank-r pair and alpha / 3 -- the original LoRAs, bit for bit;
* anything else (a LoRA trained on the fused layer): no exact split of lower rank exists without an SVD
  (which would be approximate), so each projection gets the *shared* down matrix (full fused rank R) and
  its rows of ``up``, alpha unchanged. ``up_i @ down`` is exactly the projection's rows of the fused
  delta; the file grows (three copies of ``down``).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.errors import UserError
from tsumugi.models.safetensors_write import LazyTensor
from tsumugi.networks.lora_files import LoraModule

logger = logging.getLogger(__name__)

ARCHITECTURES = ("qwen_image", "zimage")
TARGETS = ("other", "default")
KOHYA_PREFIX = "lora_unet_"
DEFAULT_DIFFUSERS_PREFIX = "diffusion_model"

_DIT_KINDS = {"qwen_image": "qwen_image_dit", "zimage": "zimage_dit"}
_DISPLAY = {"qwen_image": "Qwen-Image", "zimage": "Z-Image"}
# Constructor overrides giving every optional module of the released variants (Layered's extra
# timestep embedding, Omni's SigLIP refiner) with one block per list: indices are matched freely.
_NAME_CONFIGS = {
    "qwen_image": ({"num_layers": 1}, {"num_layers": 1, "use_additional_t_cond": True}),
    "zimage": ({"n_layers": 1, "n_refiner_layers": 1, "siglip_feat_dim": 1152},),
}
_INDEX = "#"  # stands for a block index inside name templates


# ---- module name tables --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleNames:
    """The module names of one architecture's DiT, and how file names map onto them.

    ``forms`` maps a name template (block index replaced by ``#``) in every accepted spelling -- dotted,
    kohya underscores, and the ComfyUI-native aliases of both -- to the diffusers module template(s)
    it stands for (three for a fused q/k/v).
    """

    arch: str
    block_lists: tuple[str, ...]
    modules: frozenset[str]
    forms: Mapping[str, tuple[str, ...]]

    @property
    def display(self) -> str:
        return _DISPLAY[self.arch]

    def _template(self, name: str) -> tuple[str, str | None]:
        for block in self.block_lists:
            m = re.match(re.escape(block) + r"([._])(\d+)\1", name)
            if m:
                sep = m[1]
                return f"{block}{sep}{_INDEX}{sep}{name[m.end():]}", m[2]
        return name, None

    def resolve(self, name: str) -> tuple[str, ...] | None:
        """Diffusers module path(s) of a module name as written in a file (``lora_unet_`` allowed), or None."""
        template, index = self._template(name.removeprefix(KOHYA_PREFIX))
        targets = self.forms.get(template)
        if targets is None:
            return None
        if index is None:
            return targets
        return tuple(re.sub(rf"\.{_INDEX}(?=\.|$)", f".{index}", t, count=1) for t in targets)


def _block_lists(model: torch.nn.Module) -> tuple[str, ...]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__.endswith("TransformerBlock") for child in module):
                found.append(name)
    return tuple(sorted(found, key=len, reverse=True))


def _meta_model(kind: str, overrides: Mapping[str, object]) -> torch.nn.Module:
    from tsumugi.models import configs
    from tsumugi.models.components import init_kwargs, model_class

    config = configs.released_config(kind)
    config.update(overrides)
    with torch.device("meta"):
        return model_class(kind)(**init_kwargs(kind, config))


def _native_aliases(kind: str, weights: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """ComfyUI-native module name -> diffusers module names, from the model's key converter."""
    from tsumugi.models.converters import converter

    conv = converter(kind)
    meta = {f"{w}.weight": torch.empty(3, 1, device="meta") for w in weights}
    aliases = {}
    for key in conv.from_diffusers(meta):
        native = key.removesuffix(".weight")
        back = tuple(k.removesuffix(".weight") for k in conv.to_diffusers({key: torch.empty(3, 1, device="meta")}))
        if back and back != (native,):
            aliases[native] = back
    return aliases


@functools.cache
def module_names(arch: str) -> ModuleNames:
    """The name table of ``arch`` ("qwen_image" | "zimage"), built from the diffusers class on meta."""
    if arch not in _DIT_KINDS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    kind = _DIT_KINDS[arch]
    modules: set[str] = set()
    weights: set[str] = set()
    block_lists: set[str] = set()
    for overrides in _NAME_CONFIGS[arch]:
        model = _meta_model(kind, overrides)
        lists = _block_lists(model)
        block_lists.update(lists)
        for name, module in model.named_modules():
            if not name:
                continue
            for block in lists:
                if name.startswith(f"{block}.0.") or name == f"{block}.0":
                    name = f"{block}.{_INDEX}{name[len(block) + 2:]}"
                    break
            modules.add(name)
            if isinstance(getattr(module, "weight", None), torch.nn.Parameter):
                weights.add(name)
    aliases = _native_aliases(kind, weights)

    forms: dict[str, tuple[str, ...]] = {}

    def add(form: str, targets: tuple[str, ...]) -> None:
        if forms.setdefault(form, targets) != targets:
            raise RuntimeError(f"{arch}: module name {form!r} is ambiguous: {forms[form]} or {targets}")

    for name, targets in [*((m, (m,)) for m in sorted(modules)), *sorted(aliases.items())]:
        add(name, targets)
        add(name.replace(".", "_"), targets)
    ordered = tuple(sorted(block_lists, key=len, reverse=True))
    return ModuleNames(arch, ordered, frozenset(modules), forms)


def detect_architecture(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """The architecture whose module names resolve the most of ``names`` (ties: the file's metadata)."""
    names = list(names)
    scores = {arch: sum(module_names(arch).resolve(n) is not None for n in names) for arch in ARCHITECTURES}
    best = max(scores.values())
    if best == 0:
        return None
    winners = [a for a, s in scores.items() if s == best]
    if len(winners) > 1 and metadata:
        hint = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
        return "zimage" if "z_image" in hint or "z-image" in hint else "qwen_image"
    return winners[0]


# ---- resolving and splitting ---------------------------------------------------------------------
def _qkv_rows(total: int, in_features: int) -> list[int]:
    """Rows of q, k and v in a fused projection: q has ``in_features`` rows (dim = heads x head_dim)."""
    q = in_features if in_features < total else total // 3
    kv, rest = divmod(total - q, 2)
    if rest or kv <= 0:
        q, kv = total // 3, total // 3
    return [q, kv, total - q - kv]


def split_fused(module: LoraModule, targets: tuple[str, ...]) -> tuple[list[LoraModule], bool]:
    """Split a LoRA on a fused projection into one LoRA per target; ``(modules, exact_per_rank)``.

    ``exact_per_rank`` is True when the up matrix was block-diagonal (a fusion of separate LoRAs): the
    pieces are the original rank-r LoRAs with alpha / n. Otherwise every piece shares the whole down matrix
    (see the module docstring). Either way ``piece.delta()`` equals the fused delta's rows exactly.
    """
    n = len(targets)
    down, up = module.down, module.up
    rows = _qkv_rows(up.shape[0], down.shape[1]) if n == 3 else [up.shape[0] // n] * n
    if sum(rows) != up.shape[0]:
        raise UserError(f"{module.name}: {up.shape[0]} rows cannot be split between {n} projections")
    rank = down.shape[0]
    block_diagonal = rank % n == 0 and rank >= n
    if block_diagonal:
        r = rank // n
        starts = [sum(rows[:i]) for i in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j and torch.count_nonzero(up[starts[i] : starts[i] + rows[i], j * r : (j + 1) * r]):
                    block_diagonal = False
                    break
            if not block_diagonal:
                break
    pieces = []
    start = 0
    for i, (target, count) in enumerate(zip(targets, rows)):
        if block_diagonal:
            r = rank // n
            piece_down = down[i * r : (i + 1) * r]
            piece_up = up[start : start + count, i * r : (i + 1) * r]
            alpha = None if module.alpha is None else module.alpha / n
        else:
            piece_down, piece_up, alpha = down, up[start : start + count], module.alpha
        pieces.append(LoraModule(target, piece_down.contiguous(), piece_up.contiguous(), alpha))
        start += count
    return pieces, block_diagonal


def resolve_modules(
    modules: list[LoraModule], arch: str, source: str = "LoRA", strip_prefix: str | None = None
) -> list[LoraModule]:
    """``modules`` renamed to diffusers module paths of ``arch``, fused q/k/v split.

    Raises UserError naming ``source`` when names match no module of ``arch`` or appear twice.
    """
    table = module_names(arch)
    out: list[LoraModule] = []
    unknown: list[str] = []
    loose = 0
    for module in modules:
        name = module.name
        if strip_prefix and name.startswith(strip_prefix + "."):
            name = name[len(strip_prefix) + 1 :]
        targets = table.resolve(name)
        if targets is None:
            unknown.append(module.name)
            continue
        if len(targets) == 1:
            out.append(LoraModule(targets[0], module.down, module.up, module.alpha))
            continue
        pieces, exact = split_fused(module, targets)
        loose += not exact
        out.extend(pieces)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{source}: {len(unknown)} modules match no {table.display} module name ({shown})")
    if loose:
        logger.warning(
            "%s: %d fused qkv LoRAs were not made by fusing q/k/v LoRAs; each projection keeps the whole "
            "shared down matrix (rank unchanged, exact, larger file)", source, loose,
        )
    seen: dict[str, int] = {}
    for module in out:
        seen[module.name] = seen.get(module.name, 0) + 1
    twice = sorted(n for n, c in seen.items() if c > 1)
    if twice:
        raise UserError(f"{source}: modules stored twice under different names ({', '.join(twice[:5])})")
    return out


# ---- writing layouts -----------------------------------------------------------------------------
def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def to_default(modules: list[LoraModule]) -> dict[str, torch.Tensor]:
    """Musubi/kohya keys; a missing alpha is written as the rank (scale 1, the same update)."""
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        name = KOHYA_PREFIX + m.name.replace(".", "_")
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = m.up
        out[f"{name}.alpha"] = _alpha_tensor(m.rank if m.alpha is None else m.alpha)
    return out


def _folded(tensor: torch.Tensor, factor: float) -> LazyTensor:
    """``tensor * factor`` in ``tensor``'s dtype, computed when written."""
    return LazyTensor(tensor.dtype, tuple(tensor.shape), lambda: (tensor.float() * factor).to(tensor.dtype))


def to_other(
    modules: list[LoraModule],
    prefix: str | None = DEFAULT_DIFFUSERS_PREFIX,
    keep_alpha: bool = False,
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor | LazyTensor]:
    """diffusers/ComfyUI keys ``<prefix>.<path>.lora_A[.<adapter>].weight``; alpha folded unless ``keep_alpha``.

    Folded factors are :class:`~tsumugi.models.safetensors_write.LazyTensor` entries, computed one at a time
    as :func:`~tsumugi.models.safetensors_write.save_file_streamed` writes them (no second copy of the LoRA).
    """
    head = f"{prefix}." if prefix else ""
    tail = f".{adapter_name}" if adapter_name else ""
    out: dict[str, torch.Tensor | LazyTensor] = {}
    for m in modules:
        down: torch.Tensor | LazyTensor = m.down
        up: torch.Tensor | LazyTensor = m.up
        if not keep_alpha and m.alpha is not None and m.alpha != m.rank:
            scale = m.alpha / m.rank
            root = math.sqrt(abs(scale))
            down, up = _folded(m.down, root), _folded(m.up, root if scale >= 0 else -root)
        out[f"{head}{m.name}.lora_A{tail}.weight"] = down
        out[f"{head}{m.name}.lora_B{tail}.weight"] = up
        if keep_alpha and m.alpha is not None:
            out[f"{head}{m.name}.alpha"] = _alpha_tensor(m.alpha)
    return out


# ---- files ---------------------------------------------------------------------------------------
_FACTOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")


def _check_lora_header(path: Path, flag: str) -> dict[str, str]:
    """Refuse non-LoRA files from the header alone; warn about tensors that will not be converted."""
    from tsumugi.models.safetensors_io import read_header

    if not path.is_file():
        raise UserError(f"{flag}: {path} does not exist" if not path.exists() else f"{flag}: {path} is not a file")
    try:
        infos, metadata = read_header(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    keys = list(infos)
    if any(".hada_" in k or ".lokr_" in k for k in keys):
        raise UserError(f"{flag}: {path} is a LoHa/LoKr file; only plain LoRA files can be converted")
    if not any(k.endswith(_FACTOR_SUFFIXES) for k in keys):
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise UserError(f"{flag}: {path} is not a LoRA file (no lora_down/lora_up or lora_A/lora_B keys; found {sample})")
    other = sorted(k for k in keys if not k.endswith((*_FACTOR_SUFFIXES, ".alpha")))
    if other:
        logger.warning(
            "%s: %d tensors are not LoRA factors and are left out (%s%s)",
            path, len(other), ", ".join(other[:3]), " ..." if len(other) > 3 else "",
        )
    return metadata


def read_for_conversion(
    path: str | Path, arch: str = "auto", *, flag: str = "--input", strip_prefix: str | None = None
) -> tuple[list[LoraModule], str, dict[str, str]]:
    """(modules under diffusers module paths, architecture, metadata) of a LoRA file in any layout."""
    from tsumugi.networks.lora_files import read_lora_file

    path = Path(path)
    metadata = _check_lora_header(path, flag)
    modules = read_lora_file(path, flag=flag)
    if arch == "auto":
        names = [m.name.removeprefix(f"{strip_prefix}.") if strip_prefix else m.name for m in modules]
        detected = detect_architecture(names, metadata)
        if detected is None:
            shown = ", ".join(m.name for m in modules[:3])
            raise UserError(
                f"{flag}: {path}: module names match neither Qwen-Image nor Z-Image ({shown} ...); "
                "is it a LoRA for another model?"
            )
        arch = detected
        logger.info("%s: %s LoRA (%d modules)", path, _DISPLAY[arch], len(modules))
    elif arch not in ARCHITECTURES:
        raise UserError(f"--architecture: {arch!r} is not one of auto, {', '.join(ARCHITECTURES)}")
    return resolve_modules(modules, arch, f"{flag} {path}", strip_prefix), arch, metadata


def convert_lora_file(
    input_path: str | Path,
    output_path: str | Path,
    target: str,
    *,
    diffusers_prefix: str | None = DEFAULT_DIFFUSERS_PREFIX,
    arch: str = "auto",
    keep_alpha: bool = False,
    adapter_name: str | None = None,
) -> Path:
    """Convert ``input_path`` to the ``target`` layout ("other" | "default") and write ``output_path`` atomically.

    Metadata is copied; ``sshs_model_hash``/``sshs_legacy_hash`` are recomputed when present. Tensors keep
    their dtype (alpha is written as float32).
    """
    from tsumugi.models.safetensors_write import save_file_streamed
    from tsumugi.networks.lora_save import model_hashes

    if target not in TARGETS:
        raise UserError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.is_dir():
        raise UserError(f"--output: {output_path} is a folder; give the file name to write")
    strip = diffusers_prefix if diffusers_prefix not in (None, DEFAULT_DIFFUSERS_PREFIX, "transformer") else None
    modules, arch, metadata = read_for_conversion(input_path, arch, strip_prefix=strip)
    if target == "default":
        tensors = to_default(modules)
    else:
        tensors = to_other(modules, diffusers_prefix, keep_alpha=keep_alpha, adapter_name=adapter_name)
    metadata = dict(metadata)
    if "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:  # hashes of the whole serialization
        tensors = {k: v.produce() if isinstance(v, LazyTensor) else v for k, v in tensors.items()}
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    save_file_streamed(tensors, output_path, metadata or None)  # one tensor at a time, no serialized copy
    logger.info("wrote %s (%s LoRA, %d modules, layout %s)", output_path, _DISPLAY[arch], len(modules), target)
    return output_path


__all__ = [
    "ARCHITECTURES",
    "TARGETS",
    "ModuleNames",
    "convert_lora_file",
    "detect_architecture",
    "module_names",
    "read_for_conversion",
    "resolve_modules",
    "split_fused",
    "to_default",
    "to_other",
]
