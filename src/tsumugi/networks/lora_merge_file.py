"""Merging LoRA files into a DiT file: the work of ``merge_lora`` (a ComfyUI-layout file, streamed to disk)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from tsumugi.errors import UserError

logger = logging.getLogger("tsumugi.merge_lora")


def _file_dtype(infos) -> torch.dtype | None:
    """The floating dtype holding most of the DiT's parameters."""
    sizes: Counter[torch.dtype] = Counter()
    for info in infos:
        if info.dtype is not None and info.dtype.is_floating_point:
            numel = 1
            for s in info.shape:
                numel *= s
            sizes[info.dtype] += numel
    return sizes.most_common(1)[0][0] if sizes else None


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


class _MergePlan:
    """Which LoRA updates go into which library weight, in merge order, checked against the DiT's shapes
    before any weight is read."""

    def __init__(self, arch: str, kind: str, shapes: dict[str, tuple[int, ...]], loras, device: torch.device):
        from tsumugi.models.components import KINDS
        from tsumugi.networks.lora_convert import module_names

        names = module_names(arch)
        self.device = device
        # library weight key -> [(module, multiplier, part index, row sizes)] in the order they are merged
        self.updates: dict[str, list[tuple[object, float, int, list[int]]]] = {}
        for path, modules, multiplier in loras:
            unmatched = []
            for m in modules:
                keys = [f"{t}.weight" for t in names.resolve(m.name) or ()]
                if not keys or any(k not in shapes for k in keys):
                    unmatched.append(m.name)
                    continue
                rows = [shapes[k][0] for k in keys]
                expected = (sum(rows), shapes[keys[0]][1])
                if (m.up.shape[0], m.down.shape[1]) != expected:
                    raise UserError(
                        f"--lora_weight {path}: module {m.name} has shape {(m.up.shape[0], m.down.shape[1])}, "
                        f"the model's layer expects {expected}: LoRA for another model?"
                    )
                for i, key in enumerate(keys):
                    self.updates.setdefault(key, []).append((m, multiplier, i, rows))
            if unmatched:
                shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
                raise UserError(f"--lora_weight {path}: {len(unmatched)} LoRA modules match no layer of this "
                                f"{KINDS[kind].display} ({shown})")

    def apply(self, state: dict[str, torch.Tensor]) -> None:
        """Merge every planned update into the weights of ``state`` (one block): ``W + m * delta`` in fp32,
        cast back after each update, as :func:`tsumugi.networks.lora_merge.merge_lora_modules` does."""
        deltas: dict[tuple[int, float], list[torch.Tensor]] = {}  # a fused module's delta, computed once
        for key, updates in self.updates.items():
            if key not in state:
                continue
            weight = state[key]
            for m, multiplier, part, rows in updates:
                if (id(m), multiplier) not in deltas:
                    down, up = m.down.to(self.device), m.up.to(self.device)
                    delta = type(m)(m.name, down, up, m.alpha).delta(torch.float32) * multiplier
                    deltas[(id(m), multiplier)] = list(torch.split(delta, rows, dim=0))
                weight = (weight.float() + deltas[(id(m), multiplier)][part].to(weight.device)).to(weight.dtype)
            state[key] = weight


def merge_to_file(
    dit: str | Path,
    loras: list[str | Path],
    multipliers: list[float] | None,
    output: str | Path,
    *,
    arch: str = "auto",
    device: torch.device | str = "cpu",
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Merge each LoRA with its multiplier (missing: 1.0) into ``dit`` and save a ComfyUI-layout file.

    Same result as :func:`tsumugi.models.loader.load_dit` (in ``save_dtype``) followed by
    :func:`tsumugi.networks.lora_merge.merge_lora_files`: each weight becomes ``W + m * delta`` computed in
    fp32 and cast back. Streamed: the DiT is never loaded whole; each block (``layers.3``...) is read,
    converted to the library layout, merged, converted to the ComfyUI layout and written before the next,
    so the memory used is about one block plus the LoRA files. ``device`` computes the LoRA products.
    """
    from tsumugi.models import configs
    from tsumugi.models.components import KINDS, init_kwargs
    from tsumugi.models.converters import converter
    from tsumugi.models.detect import detect
    from tsumugi.models.loader import compact_block_indices
    from tsumugi.models.safetensors_io import FLOAT8_DTYPES, SafetensorsSource
    from tsumugi.models.safetensors_write import LazyTensor, save_file_streamed
    from tsumugi.models.stream import block_group
    from tsumugi.networks.lora_convert import detect_architecture, module_names
    from tsumugi.networks.lora_files import read_lora_file

    output = Path(output)
    loras = [Path(p) for p in loras]
    multipliers = list(multipliers or [])
    if len(multipliers) > len(loras):
        raise UserError(f"--lora_multiplier: {len(multipliers)} values given for {len(loras)} --lora_weight files")
    multipliers += [1.0] * (len(loras) - len(multipliers))
    if output.is_dir():
        raise UserError(f"--save_merged_model: {output} is a folder; give the file name to write")

    det = detect(dit, "dit", flag="--dit")
    with det.source:
        if det.kind is None or KINDS[det.kind].role != "dit":
            raise UserError(f"--dit: {det.path} is {det.describe()}, expected a Qwen-Image or Z-Image DiT")
        if output.resolve() in {f.resolve() for f in det.source.files}:
            raise UserError(f"--save_merged_model: {output} is the input DiT file; write the merged model elsewhere")
        if arch == "auto":
            arch = KINDS[det.kind].arch
        elif arch != KINDS[det.kind].arch:
            raise UserError(f"--architecture {arch}: --dit {det.path} is {det.describe()}")
        if det.fp8_scaled:
            raise UserError(f"--dit: {det.path} is an fp8_scaled checkpoint (pre-quantized weights with scale "
                            "tensors); merging into those is not supported: use the bf16 (or fp16) file")
        kind = det.kind
        files = list(det.source.files)
        keymap = dict(det.keymap)
        infos = {k: det.source.info(f) for k, f in keymap.items()}
        extra_keys = [k for k in det.source.keys() if k not in set(keymap.values())]
        source_metadata = dict(det.source.metadata)
    if save_dtype is None:
        save_dtype = _file_dtype(infos.values()) or torch.bfloat16
        if save_dtype in FLOAT8_DTYPES:
            logger.warning("--dit: %s holds float8 weights; the merged model is saved in bfloat16", det.path)
            save_dtype = torch.bfloat16

    # Read every LoRA before the (large) DiT: bad files fail fast.
    lora_modules = []
    for path, multiplier in zip(loras, multipliers):
        modules = read_lora_file(path)
        found = detect_architecture(m.name for m in modules)
        if found is not None and found != arch:
            raise UserError(
                f"--lora_weight: {path} is a LoRA for {'Z-Image' if found == 'zimage' else 'Qwen-Image'}, "
                f"the DiT {det.path} is {KINDS[kind].with_article}"
            )
        unknown = [m.name for m in modules if module_names(arch).resolve(m.name) is None]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise UserError(
                f"--lora_weight: {path}: {len(unknown)} modules match no {KINDS[kind].display} module ({shown})"
            )
        lora_modules.append((path, modules, multiplier))
    if not loras:
        logger.warning("no --lora_weight given: the DiT is saved unmerged (layout conversion only)")

    # The layouts on meta tensors (no data read): file keys -> library keys -> ComfyUI keys, block by block.
    conv = converter(kind)
    original = conv.looks_like_original(keymap)

    def to_library(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return conv.to_diffusers(state) if original else dict(state)

    meta = {k: torch.empty(i.shape, dtype=i.dtype or torch.uint8, device="meta") for k, i in infos.items()}
    library = to_library(meta)
    block_list = {"qwen_image_dit": "transformer_blocks.", "zimage_dit": "layers."}[kind]
    renamed, remapped = compact_block_indices({k: k for k in library}, block_list)  # pruned checkpoints
    new_name = {old: new for new, old in renamed.items()}
    shapes = {new_name[k]: tuple(v.shape) for k, v in library.items()}
    if det.folder_config is not None:
        config = configs.clean_config(det.folder_config)
        config = init_kwargs(kind, config)
    else:
        explicit = configs.config_from_metadata(source_metadata, kind, f"--dit: {det.path}")
        config = configs.resolve_config(kind, shapes, explicit)
    if kind == "qwen_image_dit" and det.edit_2511_marker:
        config["zero_cond_t"] = True
    plan = _MergePlan(arch, kind, shapes, lora_modules, torch.device(device))

    def to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return conv.from_diffusers({new_name[k]: v for k, v in state.items()}, config)

    groups: dict[str, list[str]] = {}
    for key in keymap:
        groups.setdefault(block_group(key), []).append(key)
    outputs = {g: to_comfy(to_library({k: meta[k] for k in keys})) for g, keys in groups.items()}
    merged = {k: v for out in outputs.values() for k, v in out.items()}
    if sum(map(len, outputs.values())) != len(merged) or not _same_layout(merged, to_comfy(library)):
        logger.debug("%s: converting the whole DiT as one block", kind)  # a converter that needs all keys
        groups, outputs = {"": list(keymap)}, {"": to_comfy(library)}

    pending: dict[str, dict[str, torch.Tensor]] = {}  # block -> its converted tensors not written yet

    def produce(group: str, key: str, dtype: torch.dtype) -> torch.Tensor:
        if group not in pending:
            state = to_library({k: source.get(keymap[k], save_dtype) for k in groups[group]})
            state = {new_name[k]: v for k, v in state.items()}
            with torch.no_grad():
                plan.apply(state)
                out = conv.from_diffusers(state, config)
            pending[group] = {k: out[k] for k in outputs[group]}
        tensors = pending[group]
        tensor = tensors.pop(key)
        if not tensors:
            del pending[group]
        return tensor.to(dtype)

    tensors: dict[str, LazyTensor] = {}
    for group, out in outputs.items():
        for key, value in out.items():
            dtype = save_dtype if value.is_floating_point() else value.dtype
            tensors[key] = LazyTensor(dtype, tuple(value.shape), lambda g=group, k=key, d=dtype: produce(g, k, d))
    metadata = dict(source_metadata) if det.folder_config is None else {}
    if configs.config_from_metadata(metadata, kind) is None:
        metadata[f"{configs.CONFIG_METADATA_KEY}.{kind}"] = configs.config_to_metadata(config)[
            configs.CONFIG_METADATA_KEY]
    if loras:
        metadata["tsumugi.merged_loras"] = json.dumps(
            [{"file": p.name, "multiplier": m} for p, m in zip(loras, multipliers)]
        )
    if remapped:
        logger.info("--dit: %s has sparse block indices; the merged file numbers them 0..n-1", det.path)
    with SafetensorsSource(files) as source:
        if original:
            # Tensors of the file that the library model has no place for (Z-Image's unused norm_final).
            for key, file_key in keymap.items():
                if not conv.to_diffusers({key: torch.empty(3, 1, device="meta")}):
                    tensors[key] = source.lazy(file_key, save_dtype)
        if det.prefix:
            tensors = {det.prefix + k: v for k, v in tensors.items()}
        for key in extra_keys:  # other components of an all-in-one file, the Edit-2511 marker
            tensors[key] = source.lazy(key)
        save_file_streamed(tensors, output, metadata)
    logger.info("wrote %s (%s, %s, %d tensors)", output, KINDS[kind].display, str(save_dtype).removeprefix("torch."),
                len(tensors))
    return output
