"""Save a Qwen-Image or Z-Image DiT as one ComfyUI-layout safetensors file, streamed to disk.

The diffusers state dict is converted to the ComfyUI/original layout (:mod:`tsumugi.models.converters`)
without building a converted copy of the model: the converter first runs on meta tensors to learn the
output keys, dtypes and shapes (the file header), then each tensor is produced when its turn comes:

* renamed tensors (every Qwen-Image key, most Z-Image keys) are the parameters themselves, cast to the
  save dtype and moved to the CPU one at a time;
* tensors the converter computes (Z-Image's fused ``attention.qkv``) come from converting one block
  group (``layers.N``, ``noise_refiner.N``...) of real tensors when the first of its outputs is written;
  the group's computed outputs are dropped as they are written.

Parameters may sit on different devices (block swap keeps some on the CPU, some on the GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tsumugi.models.components import KINDS, init_kwargs
from tsumugi.models.configs import CONFIG_METADATA_KEY, clean_config, config_to_metadata
from tsumugi.models.converters import converter
from tsumugi.models.detect import EDIT_2511_MARKER
from tsumugi.models.loader import load_info
from tsumugi.models.safetensors_write import LazyTensor, save_file_streamed
from tsumugi.models.stream import block_group

logger = logging.getLogger(__name__)

__all__ = ["dit_kind", "dit_config", "comfy_lazy_tensors", "save_dit_checkpoint"]


def dit_kind(model: torch.nn.Module) -> str:
    """``qwen_image_dit`` or ``zimage_dit``: from the loader's record, else from the class name."""
    kind = load_info(model).get("kind")
    if kind is None:
        name = type(model).__name__
        kind = next((k.name for k in KINDS.values() if k.role == "dit" and k.class_name == name), None)
    if kind is None or KINDS[kind].role != "dit":
        raise ValueError(f"{type(model).__name__} is not a Qwen-Image or Z-Image DiT")
    return kind


def dit_config(model: torch.nn.Module, kind: str) -> dict[str, Any]:
    """The constructor config of ``model`` (its diffusers config; the loader's record as a fallback)."""
    config = getattr(model, "config", None)
    if config is not None:
        return clean_config(init_kwargs(kind, dict(config)))
    return dict(load_info(model).get("config", {}))


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def comfy_lazy_tensors(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    kind: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, LazyTensor]:
    """``model``'s weights in the ComfyUI/original layout (no prefix, no marker), as :class:`LazyTensor`
    entries for :func:`~tsumugi.models.safetensors_write.save_file_streamed`.

    Floating-point tensors are cast to ``dtype`` (None: kept) as they are produced.
    """
    kind = kind or dit_kind(model)
    config = dict(config) if config is not None else dit_config(model, kind)
    conv = converter(kind)
    state = {k: v.detach() for k, v in model.state_dict().items()}  # references, no copies
    meta = {k: _meta(v) for k, v in state.items()}
    full = conv.from_diffusers(meta, config)

    # Convert block group by block group; fall back to one group if that changes the result.
    groups: dict[str, list[str]] = {}
    for key in state:
        groups.setdefault(block_group(key), []).append(key)
    per_group: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name, keys in groups.items():
            per_group[name] = conv.from_diffusers({k: meta[k] for k in keys}, config)
        merged = {k: v for out in per_group.values() for k, v in out.items()}
        if sum(len(out) for out in per_group.values()) != len(merged) or not _same(merged, full):
            raise ValueError("per-group conversion differs")
    except Exception:  # a converter that needs keys of several blocks at once
        logger.debug("%s: converting the whole state dict as one group", kind)
        groups, per_group = {"": list(state)}, {"": full}

    source_of = {id(t): k for k, t in meta.items()}
    out: dict[str, LazyTensor] = {}
    computed: dict[str, dict[str, torch.Tensor]] = {}  # group -> its computed outputs not written yet

    def computed_tensor(group: str, key: str, wanted: set[str]) -> torch.Tensor:
        if group not in computed:
            inputs = {k: state[k] for k in groups[group]}
            if len({t.device for t in inputs.values()}) > 1:
                inputs = {k: t.to("cpu") for k, t in inputs.items()}
            with torch.no_grad():
                converted = conv.from_diffusers(inputs, config)
            computed[group] = {k: v for k, v in converted.items() if k in wanted}
        pending = computed[group]
        tensor = pending.pop(key)
        if not pending:
            del computed[group]
        return tensor

    def cast(tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
        return tensor.to(device="cpu", dtype=target)

    for group, converted in per_group.items():
        wanted = {k for k, v in converted.items() if id(v) not in source_of}
        for key, value in converted.items():
            target = dtype if dtype is not None and value.is_floating_point() else value.dtype
            shape = tuple(value.shape)
            if key in wanted:
                out[key] = LazyTensor(
                    target, shape,
                    lambda g=group, k=key, w=wanted, d=target: cast(computed_tensor(g, k, w), d),
                )
            else:
                tensor = state[source_of[id(value)]]
                out[key] = LazyTensor(target, shape, lambda t=tensor, d=target: cast(t, d))
    return out


def save_dit_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (a Qwen-Image or Z-Image DiT) as a ComfyUI single file at ``path``; return ``path``.

    Floating-point weights are cast to ``dtype`` (None: kept) one tensor at a time. The metadata holds
    ``tsumugi.config.<kind>`` (the model config, so the file loads back without guessing), then the
    caller's ``metadata``. A Qwen-Image DiT loaded from an Edit-2511 file (or built with
    ``zero_cond_t``) gets the ``__index_timestep_zero__`` marker back. ``extra`` tensors are written
    as given (e.g. ``norm_final.weight`` of the released Z-Image file). Written atomically.
    """
    kind = dit_kind(model)
    config = dit_config(model, kind)
    tensors: dict[str, LazyTensor | torch.Tensor] = dict(comfy_lazy_tensors(model, dtype=dtype, kind=kind,
                                                                            config=config))
    if kind == "qwen_image_dit" and (load_info(model).get("edit_2511_marker") or config.get("zero_cond_t")):
        tensors[EDIT_2511_MARKER] = torch.empty(0, dtype=dtype or torch.bfloat16)
    for key, tensor in (extra or {}).items():
        if key in tensors:
            raise ValueError(f"extra tensor {key!r} is already a weight of the {KINDS[kind].display}")
        tensors[key] = tensor
    meta = {f"{CONFIG_METADATA_KEY}.{kind}": config_to_metadata(config)[CONFIG_METADATA_KEY]}
    meta.update(metadata or {})
    return save_file_streamed(tensors, path, meta)
