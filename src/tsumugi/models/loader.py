"""Load a DiT, VAE or text encoder from any supported file layout into its diffusers/transformers class.

Steps: :func:`~tsumugi.models.detect.detect` the path (keys only) -> refuse a wrong component or an
fp8_scaled file -> convert the key set on meta tensors to the library layout -> resolve the config
(``config.json`` of folders; otherwise released config + ``tsumugi.config`` metadata + shapes) -> build
the module on the meta device and check keys and shapes -> stream: each tensor is read (no memory
map), converted, cast to ``dtype``, passed through the load steps (LoRA merge, fp8), placed on its final
device and assigned before the next one is read (:mod:`tsumugi.models.stream`; ``docs/model_files.md``,
"Memory while loading").

What the loader learned is attached to the returned module as ``model._tsumugi_info`` (read it with
:func:`load_info`): ``kind``, ``layout``, ``prefix``, ``path``, ``files``, ``edit_2511_marker`` (the
ComfyUI ``__index_timestep_zero__`` key was present and removed; the DiT is then built with
``zero_cond_t=True``), ``fp8_weights`` (float8 tensors were upcast), ``remapped_blocks`` (sparse
block indices of a pruned DiT were renumbered), ``config`` (the constructor config used).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tsumugi.errors import UserError
from tsumugi.models import configs
from tsumugi.models.components import KINDS, init_kwargs, instantiate, kind_for
from tsumugi.models.converters import converter
from tsumugi.models.detect import Detection, detect
from tsumugi.models.stream import (
    HostTensors,
    LoadStep,
    Placement,
    assign,
    block_group,
    host_allocations_returned,
    place,
    retype_meta,
)

logger = logging.getLogger(__name__)

INFO_ATTR = "_tsumugi_info"

# Block lists of DiTs whose indices may be sparse in pruned checkpoints.
_BLOCK_LISTS = {"qwen_image_dit": ("transformer_blocks.",), "zimage_dit": ("layers.",)}


def load_dit(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--dit",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    steps: Sequence[LoadStep] = (),
    host_tensors: HostTensors | None = None,
    pin_host: bool = False,
) -> torch.nn.Module:
    """The DiT of ``arch`` ("qwen_image" | "zimage") from ``path``.

    ``config_overrides`` win over everything else (e.g. ``{"zero_cond_t": True}`` for Edit-2511).
    ``steps`` transform each tensor as it streams in (LoRA merge, fp8 quantization, in that order);
    ``host_tensors`` names the tensors that stay in host memory (pinned with ``pin_host``) instead of
    going to ``device`` (block swap's streamed weights, see :func:`~tsumugi.memory.block_swap.swap_host_tensors`).
    """
    return load_component(path, kind_for("dit", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides, steps=steps, host_tensors=host_tensors,
                          pin_host=pin_host)


def load_vae(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--vae",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The VAE of ``arch``: AutoencoderKLQwenImage (qwen_image) or the FLUX AutoencoderKL (zimage)."""
    return load_component(path, kind_for("vae", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides)


def load_text_encoder(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--text_encoder",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    steps: Sequence[LoadStep] = (),
) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration (qwen_image) or Qwen3Model (zimage).

    ``steps``: see :func:`load_dit` (e.g. :class:`~tsumugi.memory.fp8_linear.Fp8LinearStep` for
    ``--fp8_vl`` / ``--fp8_llm``).
    """
    return load_component(path, kind_for("text_encoder", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides, steps=steps)


def load_info(model: torch.nn.Module) -> dict[str, Any]:
    """What the loader recorded about ``model`` (empty for modules it did not load)."""
    return getattr(model, INFO_ATTR, {})


# ---- the generic path -----------------------------------------------------------------------------
def load_component(
    path: str | Path,
    kind: str,
    *,
    flag: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    steps: Sequence[LoadStep] = (),
    host_tensors: HostTensors | None = None,
    pin_host: bool = False,
) -> torch.nn.Module:
    spec = KINDS[kind]
    det = detect(path, kind, flag=flag)
    with det.source:
        if det.kind != kind:
            raise UserError(f"{flag}: {det.path} is {det.describe()}, expected {spec.with_article}")
        if det.fp8_scaled:
            raise UserError(
                f"{flag}: {det.path} is an fp8_scaled checkpoint (pre-quantized weights with scale tensors); "
                "loading those is not supported yet: use the bf16 (or fp16) file"
            )
        return _load(det, kind, flag=flag, dtype=dtype, device=device, config_overrides=config_overrides,
                     steps=steps, host_tensors=host_tensors, pin_host=pin_host)


def _load(
    det: Detection,
    kind: str,
    *,
    flag: str,
    dtype: torch.dtype,
    device: torch.device | str,
    config_overrides: Mapping[str, Any] | None,
    steps: Sequence[LoadStep] = (),
    host_tensors: HostTensors | None = None,
    pin_host: bool = False,
) -> torch.nn.Module:
    conv = converter(kind)
    needs_conversion = conv.looks_like_original(det.keymap.keys())
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())

    # Learn the library-layout keys and shapes without reading data (converters are pure key/shape
    # functions, so they run on meta tensors); a converter that needs values gets the real tensors.
    preread: dict[str, torch.Tensor] | None = None
    meta = {k: torch.empty(det.source.info(f).shape, device="meta") for k, f in det.keymap.items()}
    try:
        converted = conv.to_diffusers(meta) if needs_conversion else dict(meta)
    except Exception:
        logger.debug("converter for %s needs tensor data; converting before the key check", kind)
        preread = {k: det.source.get(f, dtype) for k, f in det.keymap.items()}
        converted = conv.to_diffusers(preread) if needs_conversion else preread
    layout_keys, remapped = _prepare_keys(kind, dict(converted))
    shapes = {k: tuple(v.shape) for k, v in layout_keys.items()}

    config = _config(det, kind, shapes, flag)
    if kind == "qwen_image_dit" and det.edit_2511_marker:
        config["zero_cond_t"] = True
    if config_overrides:
        config.update(config_overrides)

    try:
        model = instantiate(kind, config)
    except Exception as e:
        hint = ""
        has_metadata_config = any(k.startswith(configs.CONFIG_METADATA_KEY) for k in det.source.metadata)
        if det.folder_config is None and not has_metadata_config:
            hint = (" (the file has no config.json or tsumugi.config metadata: the released model's values"
                    " were assumed for what tensor shapes cannot tell)")
        raise UserError(
            f"{flag}: cannot build {KINDS[kind].with_article} from {det.path}: {type(e).__name__}: {e}{hint}"
        ) from e
    expected = model.state_dict()
    tie_lm_head = _tied_lm_head(model, expected, shapes)
    _check_keys(flag, det, kind, expected, shapes, ignore={"lm_head.weight"} if tie_lm_head else set())

    # Final dtypes on the meta module, then the steps restructure it; then stream the data in.
    retype_meta(model, list(expected), dtype)
    for step in steps:
        step.prepare(model)
    host = set(host_tensors(model)) if host_tensors is not None else set()
    pinned = pin_host and bool(host) and torch.cuda.is_available()  # page-locking needs a CUDA driver
    on_device, on_host = Placement(device), Placement(torch.device("cpu"), pinned=pinned)
    assigned: set[str] = set()

    def emit(key: str, tensor: torch.Tensor) -> None:
        where = on_host if key in host else on_device
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(device=where.device, dtype=dtype)
        elif tensor.device != where.device:
            tensor = tensor.to(where.device)
        outputs = {key: tensor}
        for step in steps:
            outputs = {k2: v2 for k, v in outputs.items() for k2, v2 in step.apply(k, v).items()}
        for out_key, value in outputs.items():
            value = place(value, on_host if out_key in host else on_device)
            assign(model, out_key, value)
            assigned.add(out_key)
            if tie_lm_head and out_key == _embed_key(kind):
                assign(model, "lm_head.weight", value)
                assigned.add("lm_head.weight")

    with torch.no_grad(), host_allocations_returned():
        for key, tensor in _stream(det, conv, needs_conversion, meta, converted, layout_keys, preread, host,
                                   dtype, pinned):
            emit(key, tensor)
    del preread

    missing = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{flag}: streaming {det.path} left {len(missing)} tensors unloaded: {missing[:4]}")
    _move_unloaded_buffers(model, assigned, device)
    for step in steps:
        step.finish(model)
    model.eval()
    setattr(model, INFO_ATTR, {
        "kind": kind,
        "layout": det.layout,
        "prefix": det.prefix,
        "path": str(det.path),
        "files": [str(f) for f in det.source.files],
        "edit_2511_marker": det.edit_2511_marker,
        "fp8_weights": det.fp8_weights,
        "remapped_blocks": remapped,
        "config": config,
    })
    if det.edit_2511_marker:
        logger.info("%s: %s carries the Edit-2511 marker %s (removed)", flag, det.path, "__index_timestep_zero__")
    return model


def _stream(
    det: Detection,
    conv: Any,
    needs_conversion: bool,
    meta: dict[str, torch.Tensor],
    converted: dict[str, torch.Tensor],
    final: dict[str, torch.Tensor],
    preread: dict[str, torch.Tensor] | None,
    host: set[str],
    dtype: torch.dtype,
    pin_host: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(library key, tensor)`` pairs, one file tensor read at a time, in file order.

    A converted key whose tensor is an input tensor (a rename: every key but Z-Image's split qkv) is read
    and yielded as is. An input the converter consumes (the fused qkv) is read alone and converted with
    the other keys of its block as meta stand-ins; its real outputs are yielded (views of the read
    tensor: the caller copies them into their own storage, so the fused tensor is freed right after).
    """
    final_of = {id(v): k for k, v in final.items()}
    conv_to_final = {ck: final_of[id(v)] for ck, v in converted.items() if id(v) in final_of}
    if preread is not None:
        for ck, v in converted.items():
            if ck in conv_to_final:
                yield conv_to_final[ck], v
        return
    input_of = {id(m): k for k, m in meta.items()}
    renames: dict[str, list[str]] = {}
    computed: set[str] = set()
    for ck, v in converted.items():
        if ck not in conv_to_final:
            continue
        if id(v) in input_of:
            renames.setdefault(input_of[id(v)], []).append(conv_to_final[ck])
        else:
            computed.add(ck)
    groups: dict[str, list[str]] = {}
    for k in meta:
        groups.setdefault(block_group(k), []).append(k)
    order = sorted(det.keymap, key=lambda k: (str(det.source.info(det.keymap[k]).file),
                                               det.source.info(det.keymap[k]).start))
    done: set[str] = set()
    for k in order:
        file_key = det.keymap[k]
        targets = renames.get(k)
        if targets is not None:
            info = det.source.info(file_key)
            direct_host = len(targets) == 1 and targets[0] in host and pin_host
            same_dtype = info.dtype is not None and not (info.dtype.is_floating_point and info.dtype != dtype)
            tensor = det.source.read(file_key, pin_memory=direct_host and same_dtype)
            for target in targets:
                yield target, tensor
            del tensor
            continue
        if not needs_conversion or not computed - done:
            continue  # dropped by the conversion (e.g. Z-Image's unused norm_final)
        group = groups[block_group(k)]
        real = det.source.read(file_key)
        try:
            out = conv.to_diffusers({g: (real if g == k else meta[g]) for g in group})
        except Exception:  # an output needing several inputs at once: convert the block with real data
            out = conv.to_diffusers({g: det.source.read(det.keymap[g]) for g in group})
        for ck, v in out.items():
            if ck in computed and ck not in done and v.device.type != "meta":
                done.add(ck)
                yield conv_to_final[ck], v
        del real, out


def _move_unloaded_buffers(model: torch.nn.Module, assigned: set[str], device: torch.device) -> None:
    """Buffers the file does not hold (built real on the CPU, e.g. RoPE tables) go to ``device``."""
    for name, module in model.named_modules():
        for bname, b in module._buffers.items():
            key = f"{name}.{bname}" if name else bname
            if b is not None and key not in assigned and b.device != device:
                module._buffers[bname] = b.to(device)


def _prepare_keys(kind: str, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Library-layout fix-ups shared by all sources: drop an unused LM head, renumber sparse blocks."""
    if kind == "qwen3":
        sd.pop("lm_head.weight", None)  # Qwen3ForCausalLM folders; Qwen3Model has no head
    remapped = False
    for prefix in _BLOCK_LISTS.get(kind, ()):
        sd, changed = compact_block_indices(sd, prefix)
        remapped = remapped or changed
    return sd, remapped


def compact_block_indices(sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Renumber ``{prefix}N.`` keys to 0..n-1 keeping their order (pruned checkpoints skip blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = sorted({int(m[1]) for k in sd if (m := pattern.match(k))})
    if indices == list(range(len(indices))):
        return sd, False
    new_index = {old: new for new, old in enumerate(indices)}
    out = {}
    for key, value in sd.items():
        m = pattern.match(key)
        out[f"{prefix}{new_index[int(m[1])]}.{key[m.end():]}" if m else key] = value
    return out, True


def _config(det: Detection, kind: str, shapes: Mapping[str, tuple[int, ...]], flag: str) -> dict[str, Any]:
    if det.folder_config is not None:
        config = configs.clean_config(det.folder_config)
        if KINDS[kind].library == "diffusers":
            config = init_kwargs(kind, config)
        return config
    explicit = configs.config_from_metadata(det.source.metadata, kind, f"{flag}: {det.source.label}")
    config = configs.resolve_config(kind, shapes, explicit)
    if gaps := configs.unproven_dit_values(kind, config, shapes, explicit):
        raise UserError(
            f"{flag}: {det.path}: cannot determine {' and '.join(gaps)} of {KINDS[kind].with_article} from its "
            f"tensor shapes or a stored config; pass a diffusers folder with its config.json, "
            f"or store the constructor arguments as JSON in the file's metadata under "
            f"{configs.CONFIG_METADATA_KEY!r}"
        )
    return config


def _embed_key(kind: str) -> str:
    return "model.language_model.embed_tokens.weight" if kind == "qwen2_5_vl" else "embed_tokens.weight"


def _tied_lm_head(model: torch.nn.Module, expected: Mapping[str, Any], shapes: Mapping[str, Any]) -> bool:
    """Whether the file omits an LM head that the config ties to the embeddings."""
    if "lm_head.weight" not in expected or "lm_head.weight" in shapes:
        return False
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def _check_keys(
    flag: str,
    det: Detection,
    kind: str,
    expected: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    ignore: set[str],
) -> None:
    """Missing/unexpected keys and shape mismatches, before any tensor is read."""
    missing = sorted(set(expected) - set(shapes) - ignore)
    unexpected = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    if not problems:
        wrong = [
            f"{k} {tuple(shapes[k])} vs {tuple(t.shape)}"
            for k, t in expected.items()
            if k in shapes and tuple(shapes[k]) != tuple(t.shape)
        ]
        if wrong:
            problems.append(f"{len(wrong)} tensors with unexpected shapes (e.g. {'; '.join(wrong[:3])})")
    if problems:
        spec = KINDS[kind]
        raise UserError(
            f"{flag}: {det.path} does not match the {spec.display} model built from its config: "
            + "; ".join(problems)
        )


__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_component", "load_info", "compact_block_indices"]
