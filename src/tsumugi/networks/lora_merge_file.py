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
    """Load ``dit``, merge each LoRA with its multiplier (missing: 1.0), save a ComfyUI-layout file.

    Same result as :func:`tsumugi.models.loader.load_dit` (in ``save_dtype``) followed by
    :func:`tsumugi.networks.lora_merge.merge_lora_files`: each weight becomes ``W + m * delta`` computed in
    fp32 and cast back. The DiT is held on the CPU; ``device`` computes the LoRA products.
    """
    from tsumugi.models.components import KINDS
    from tsumugi.models.configs import CONFIG_METADATA_KEY, config_from_metadata, config_to_metadata
    from tsumugi.models.converters import converter
    from tsumugi.models.detect import detect
    from tsumugi.models.dit_checkpoint import comfy_lazy_tensors
    from tsumugi.models.loader import load_dit, load_info
    from tsumugi.models.safetensors_io import FLOAT8_DTYPES, LazyTensor, SafetensorsSource, save_file_streamed
    from tsumugi.networks.lora_convert import detect_architecture, module_names
    from tsumugi.networks.lora_files import read_lora_file
    from tsumugi.networks.lora_merge import merge_lora_modules

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
        kind = det.kind
        files = list(det.source.files)
        layout, prefix = det.layout, det.prefix
        dit_keys = set(det.keymap.values())
        extra_keys = [k for k in det.source.keys() if k not in dit_keys]
        source_metadata = dict(det.source.metadata) if det.folder_config is None else {}
        dtype = _file_dtype(det.source.info(k) for k in dit_keys)
    if save_dtype is None:
        save_dtype = dtype or torch.bfloat16
        if save_dtype in FLOAT8_DTYPES:
            logger.warning("--dit: %s holds float8 weights; the merged model is saved in bfloat16", det.path)
            save_dtype = torch.bfloat16

    # Read every LoRA before the (large) DiT: bad files fail fast.
    lora_modules = []
    for path in loras:
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
        lora_modules.append(modules)
    if not loras:
        logger.warning("no --lora_weight given: the DiT is saved unmerged (layout conversion only)")

    model = load_dit(dit, arch, dtype=save_dtype, device="cpu")
    config = load_info(model).get("config", {})
    with torch.no_grad():
        for path, modules, multiplier in zip(loras, lora_modules, multipliers):
            for m in modules:
                m.down, m.up = m.down.to(device), m.up.to(device)
            count = merge_lora_modules(model, modules, multiplier, source=f"--lora_weight {path}")
            logger.info("merged %s (x%.3g): %d weights", path, multiplier, count)
    lora_modules.clear()

    # Streamed: the file is written one (converted) tensor at a time, never a full converted copy.
    tensors: dict[str, LazyTensor] = comfy_lazy_tensors(model, kind=kind, config=config)
    conv = converter(kind)
    metadata = dict(source_metadata)
    if config_from_metadata(metadata, kind) is None:
        metadata[f"{CONFIG_METADATA_KEY}.{kind}"] = config_to_metadata(config)[CONFIG_METADATA_KEY]
    if loras:
        metadata["tsumugi.merged_loras"] = json.dumps(
            [{"file": p.name, "multiplier": m} for p, m in zip(loras, multipliers)]
        )
    with SafetensorsSource(files) as source:
        if layout != "diffusers":
            # Tensors of the file that the library model has no place for (Z-Image's unused norm_final).
            for key, file_key in det.keymap.items():
                if not conv.to_diffusers({key: torch.empty(3, 1, device="meta")}):
                    tensors[key] = source.lazy(file_key, save_dtype)
        if prefix:
            tensors = {prefix + k: v for k, v in tensors.items()}
        for key in extra_keys:  # other components of an all-in-one file, the Edit-2511 marker
            tensors[key] = source.lazy(key)
        save_file_streamed(tensors, output, metadata)
    logger.info("wrote %s (%s, %s, %d tensors)", output, KINDS[kind].display, str(save_dtype).removeprefix("torch."),
                len(tensors))
    return output
