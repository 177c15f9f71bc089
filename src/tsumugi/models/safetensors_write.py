"""Writing safetensors files: atomically (temporary name, fsync, rename), streamed one tensor at a time,
with the umask's file mode, and with a clear error when the disk is full. Reading is
:mod:`tsumugi.models.safetensors_io`.

:func:`save_file_atomic` hands a dict of tensors to the safetensors library; :func:`save_file_streamed`
writes the same bytes from :class:`LazyTensor` entries (dtype + shape known up front, data produced one
tensor at a time), so a large model can be written, cast or re-laid-out on the way without holding a
second copy of it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.errors import UserError
from tsumugi.fault_points import pause_point
from tsumugi.models.safetensors_io import _DTYPES


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def _prepare_for_save(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases, e.g. tied weights)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach()
        skey = _storage_key(t)
        if skey is not None and skey in seen:
            t = t.clone()
        elif skey is not None:
            seen.add(skey)
        out[key] = t.contiguous().cpu()
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_mode(path: str | Path) -> None:
    """Give a file written under a temporary name the mode of an ordinary new file (``0666 & ~umask``).

    Some writers (the safetensors library, ``tempfile``) create files as 0600, and a rename keeps that
    mode: a LoRA would then be unreadable to e.g. ComfyUI running as another user.
    """
    os.chmod(path, 0o666 & ~current_umask())


def give_default_modes(directory: str | Path) -> None:
    """:func:`apply_default_mode` for every file under ``directory`` (e.g. accelerate's state folder)."""
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            apply_default_mode(path)


def replace_atomic(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it the umask's mode, rename it over ``path`` and fsync the directory."""
    pause_point("file-fsync")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    apply_default_mode(tmp)
    pause_point("file-rename")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class DiskFullError(UserError):
    """No space left while writing ``path`` (which needed ``needed`` bytes); the previous file is intact."""

    def __init__(self, path: Path, needed: int, free: int | None) -> None:
        self.path, self.needed, self.free = Path(path), needed, free
        free_text = f", {_size_text(free)} free" if free is not None else ""
        super().__init__(f"no space left on the device while writing {self.path}: it needs "
                         f"{_size_text(needed)}{free_text} (the previous file, if any, is unchanged)")


def _size_text(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # unreachable


def free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _raise_if_disk_full(exc: BaseException, path: Path, needed: int) -> None:
    """Re-raise a full disk (an OSError, or the safetensors library's error for one) as :class:`DiskFullError`."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (not isinstance(exc, OSError) and isinstance(exc, Exception)
                    and any(s in str(exc) for s in ("StorageFull", "No space left", "code: 28")))
    if full:
        raise DiskFullError(path, needed, free_bytes(path.parent)) from exc


def temp_path_for(path: Path) -> Path:
    """A temporary name next to ``path`` (same filesystem, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file under a temporary name in the same folder, fsync it, rename it into place.

    A crash leaves either the old file or the new one, never a truncated one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    prepared = _prepare_for_save(tensors)
    try:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)
        pause_point("file-write")
        replace_atomic(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path, sum(t.nbytes for t in prepared.values()) + 1024)
        raise
    return path


# ---- streamed writing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LazyTensor:
    """A tensor to write, announced by dtype and shape; ``produce()`` makes it when its turn comes.

    ``produce`` may return the tensor on any device; it must have exactly ``dtype`` and ``shape``.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> LazyTensor:
        """``tensor`` (a reference, no copy), cast to ``dtype`` when produced if it is floating-point."""
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if tensor.dtype == target:
            return cls(target, tuple(tensor.shape), lambda: tensor)
        return cls(target, tuple(tensor.shape), lambda: tensor.to(device="cpu", dtype=target))


# safetensors dtype names in the order of the library's ``Dtype`` enum (safetensors 0.8, verified by
# experiment for every dtype ``safetensors.torch`` can save): the library writes tensors by this rank
# descending, then by key. F4/F6/F8_E8M0 places are from the enum declaration (torch cannot save them
# through the library, so there is nothing to be byte-identical with).
_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}
_WRITE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
for _name, _attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64")):
    if hasattr(torch, _attr):
        _WRITE_NAMES[getattr(torch, _attr)] = _name


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _WRITE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {dtype}") from None


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel * torch.empty((), dtype=dtype, device="meta").element_size()


def _as_lazy(key: str, value: LazyTensor | torch.Tensor) -> LazyTensor:
    if isinstance(value, LazyTensor):
        return LazyTensor(value.dtype, tuple(int(s) for s in value.shape), value.produce)
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: it has no data to write")
        return LazyTensor.of(value)
    raise TypeError(f"{key!r}: expected a torch.Tensor or a LazyTensor, got {type(value).__name__}")


def streamed_header(
    specs: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) and the data order of a file holding ``specs``.

    Layout as ``safetensors.torch.save_file`` writes it: tensors sorted by dtype rank (descending) then
    key, packed without gaps; compact JSON (``__metadata__`` first) padded with spaces to a multiple of 8.
    """
    if "__metadata__" in specs:
        raise ValueError("'__metadata__' cannot be a tensor name")
    names = {key: _dtype_name(spec.dtype) for key, spec in specs.items()}
    order = sorted(specs, key=lambda k: (-_DTYPE_RANK.get(names[k], -1), k))
    header: dict[str, object] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key in order:
        spec = specs[key]
        end = offset + _nbytes(spec.dtype, spec.shape)
        header[key] = {"dtype": names[key], "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a contiguous CPU tensor (no copy on little-endian machines)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    data = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and tensor.element_size() > 1:
        data = data.reshape(-1, tensor.element_size())[:, ::-1].copy()
    return memoryview(data).cast("B")


def save_file_streamed(
    tensors: Mapping[str, LazyTensor | torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file producing one tensor at a time; atomic like :func:`save_file_atomic`.

    ``tensors`` maps keys to :class:`LazyTensor` entries (or plain tensors). The header is computed from
    the announced dtypes and shapes; then each entry is produced in file order, checked against its
    announcement (ValueError naming the key otherwise), moved to the CPU, written and dropped. The
    output is byte-identical to ``safetensors.torch.save_file`` of the same tensors and metadata (up to
    the order of the metadata entries, which the library takes from a hash map).
    """
    specs = {key: _as_lazy(key, value) for key, value in tensors.items()}
    header, order = streamed_header(specs, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    expected = len(header) + sum(_nbytes(s.dtype, s.shape) for s in specs.values())
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            pause_point("file-write")
            for key in order:
                spec = specs[key]
                tensor = spec.produce()
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"{key!r}: the producer returned {type(tensor).__name__}, not a tensor")
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(
                        f"{key!r}: the producer returned {tensor.dtype} {tuple(tensor.shape)}, the header "
                        f"announced {spec.dtype} {spec.shape}"
                    )
                if tensor.device.type == "meta":
                    raise ValueError(f"{key!r}: the producer returned a meta tensor (no data)")
                tensor = tensor.detach().to("cpu").contiguous()
                f.write(_tensor_bytes(tensor))
                del tensor
            if f.tell() != expected:
                raise RuntimeError(f"{tmp}: wrote {f.tell()} bytes, the header describes {expected}")
        replace_atomic(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path, expected)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Atomic counterpart of ``Path.write_text`` (config.json, index files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        replace_atomic(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path, len(text.encode("utf-8")))
        raise
    return path
