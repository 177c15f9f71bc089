"""Cache file names, tensor keys and metadata (Musubi's format, ``docs/design.md``, "Cache files").

File names: ``{stem}_{W:04d}x{H:04d}_{arch}.safetensors`` (latents; W×H is the ORIGINAL image size)
and ``{stem}_{arch}_te.safetensors`` (text-encoder outputs). Tensor keys carry shape and dtype:
``latents_{F}x{h}x{w}_{dtype}``, ``latents_control_{i}_1x{h}x{w}_{dtype}``, ``varlen_vl_embed_{dtype}``,
``varlen_llm_embed_{dtype}``.

Besides Musubi's metadata (``architecture``, ``width``, ``height``, ``caption1``, ``format_version``)
tsumugi writes ``tsumugi.*`` keys that identify what a cache was made from. Readers treat a missing
key as "unknown" (a Musubi cache) and a differing key as stale.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsumugi.errors import UserError
from tsumugi.models.safetensors_write import apply_default_mode

FORMAT_VERSION = "1.0.1"
_DTYPE_NAMES = sorted(
    (str(d).removeprefix("torch.") for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.uint8, torch.bool,
    )),
    key=len,
    reverse=True,
)
_SHAPE_TOKEN = re.compile(r"_\d+x\d+x\d+$")
ARCH_METADATA_NAME = {"qi": "qwen_image", "qie": "qwen_image", "qil": "qwen_image", "zi": "z_image"}
MUSUBI_CACHE_DTYPES = {
    ("qwen_image", "latent"): torch.bfloat16,
    ("qwen_image", "text"): torch.bfloat16,
    ("zimage", "latent"): torch.float32,
    ("zimage", "text"): torch.bfloat16,
}
"""The dtype Musubi stores each cached tensor in (it saves what its encoders output): its Qwen-Image VAE
computes in the dtype of the VAE file (bf16 for the released one), its Z-Image VAE in float32, and both
text encoders run in bf16 (an fp8 encoder's output is stored as bf16)."""
CACHE_DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dtype(arch_name: str, kind: str, requested: str | None = None) -> torch.dtype:
    """The dtype to store ``kind`` (``"latent"`` / ``"text"``) tensors in: ``requested`` (a
    ``--cache_dtype`` name) or Musubi's (:data:`MUSUBI_CACHE_DTYPES`)."""
    if requested is not None:
        return CACHE_DTYPE_CHOICES[requested]
    return MUSUBI_CACHE_DTYPES[(arch_name, kind)]


def latent_cache_name(stem: str, width: int, height: int, arch_code: str) -> str:
    return f"{stem}_{width:04d}x{height:04d}_{arch_code}.safetensors"


def text_cache_name(stem: str, arch_code: str) -> str:
    return f"{stem}_{arch_code}_te.safetensors"


def parse_latent_cache_name(name: str) -> tuple[str, int, int, str]:
    """``cat01_1536x1024_qi.safetensors`` -> ("cat01", 1536, 1024, "qi"), parsed from the right."""
    base = name.removesuffix(".safetensors")
    parts = base.split("_")
    if len(parts) < 3 or not re.fullmatch(r"\d+x\d+", parts[-2]):
        raise ValueError(f"not a latent cache file name: {name}")
    width, height = (int(v) for v in parts[-2].split("x"))
    return "_".join(parts[:-2]), width, height, parts[-1]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def latent_key(tensor: torch.Tensor, name: str = "latents") -> str:
    """``latents_{F}x{h}x{w}_{dtype}``; a 3-D (C, h, w) tensor (Z-Image) is written as ``1x{h}x{w}``."""
    frames = 1 if tensor.dim() == 3 else tensor.shape[1]
    return f"{name}_{frames}x{tensor.shape[-2]}x{tensor.shape[-1]}_{dtype_name(tensor.dtype)}"


def varlen_key(name: str, tensor: torch.Tensor) -> str:
    return f"varlen_{name}_{dtype_name(tensor.dtype)}"


def strip_key(key: str) -> str:
    """The batch name of a stored key: dtype suffix, ``varlen_`` prefix and (latents) shape token removed."""
    for dtype in _DTYPE_NAMES:
        if key.endswith("_" + dtype):
            key = key[: -len(dtype) - 1]
            break
    if key.startswith("latents"):
        key = _SHAPE_TOKEN.sub("", key)
    return key.removeprefix("varlen_")


def write_cache_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic write (temporary name in the same folder, then rename); NaNs become 0 with a warning."""
    import logging

    clean = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.is_floating_point() and torch.isnan(tensor).any():
            logging.getLogger(__name__).warning("%s: NaN in %s replaced by 0", path, key)
            tensor = torch.nan_to_num(tensor, nan=0.0)
        clean[key] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(clean, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        apply_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(directory: Path) -> int:
    """Delete ``write_cache_file`` leftovers of an interrupted run (``.<name>.<pid>.tmp``)."""
    count = 0
    for tmp in directory.glob(".*.safetensors.*.tmp"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def read_cache_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors under their batch names, and the metadata; a corrupt file is an error naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {strip_key(k): f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as exc:
        raise UserError(f"{path}: unreadable cache file ({exc}); re-run the caching script") from None
    return tensors, metadata


def update_cache_metadata(path: Path, updates: dict[str, str]) -> None:
    """Rewrite a cache with the same tensors (stored keys unchanged) and ``updates`` merged into its metadata."""
    from safetensors.torch import load_file

    metadata = read_cache_metadata(path) or {}
    write_cache_file(path, load_file(str(path)), {**metadata, **updates})


def read_cache_metadata(path: Path) -> dict[str, str] | None:
    """Metadata only, or None when the file is missing or unreadable (then it is re-made)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


def is_our_cache(path: Path, arch_code: str, kind: str) -> bool:
    """Whether ``path`` is provably a ``kind`` (``"latent"`` or ``"text"``) cache of ``arch_code``.

    Only a safetensors file whose metadata names this architecture as Musubi and tsumugi write it
    (``architecture``, with a ``format_version``) and whose every tensor key is a cache key qualifies:
    a user's LoRA or model that merely has a cache-like name is not one, and is never deleted.
    """
    if kind == "latent":
        try:
            parse_latent_cache_name(path.name)
        except ValueError:
            return False
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception:
        return False
    if metadata.get("architecture") != ARCH_METADATA_NAME.get(arch_code) or "format_version" not in metadata:
        return False
    if kind == "latent":
        names = {strip_key(k) for k in keys}
        return "latents" in names and all(re.fullmatch(r"latents(_control_\d+)?(_\d+x\d+)?", n) for n in names)
    return bool(keys) and all(k.startswith("varlen_") for k in keys)


def stale_reasons(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    """What differs between a cache's ``tsumugi.*`` metadata and what the current run would write.

    Keys absent from ``found`` are unknown (e.g. a Musubi cache) and not reported.
    """
    reasons = []
    for key, value in expected.items():
        if key in found and found[key] != value:
            reasons.append(f"{key.removeprefix('tsumugi.')} was {found[key]!r}, now {value!r}")
    return reasons
