"""Reading safetensors files: single files, shard sets, index files (writing: ``safetensors_write``).

Reading is lazy: :func:`open_safetensors` parses only the JSON headers (keys, dtypes, shapes, data
offsets, metadata), so detection and config derivation never touch tensor data. Tensors are then read
one at a time with ``pread`` into memory they own (no memory map: nothing read can keep the file mapped)
and cast to the requested dtype as each is read.

We parse the header ourselves (8-byte little-endian length + JSON) to check a file before handing it to
safetensors: a truncated download or a non-safetensors file becomes a :class:`UserError` naming the
file instead of a Rust panic message.

"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tsumugi.errors import UserError

if TYPE_CHECKING:
    from tsumugi.models.safetensors_write import LazyTensor

# Upper bound of a header: the safetensors library refuses larger ones too.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

FLOAT8_DTYPES = frozenset(d for d in _DTYPES.values() if "float8" in str(d))

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    dtype: torch.dtype | None  # None: a dtype torch cannot represent
    dtype_name: str
    shape: tuple[int, ...]
    file: Path
    start: int = -1  # absolute byte offset of the data in ``file`` (-1: unknown)
    stop: int = -1


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Keys and metadata of one safetensors file, without reading tensor data.

    Raises UserError for a missing, truncated or malformed file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise UserError(
                    f"{path} is truncated or not a safetensors file "
                    f"(header claims {header_len} bytes, file has {size})"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt or not a safetensors file (bad header: {e})") from e

    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    try:
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            data_end = max(data_end, int(end))
            name = str(entry["dtype"])
            tensors[key] = TensorInfo(_DTYPES.get(name), name, tuple(int(s) for s in entry["shape"]), path,
                                      8 + header_len + int(begin), 8 + header_len + int(end))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is corrupt (bad tensor entry in header: {e})") from e
    if 8 + header_len + data_end > size:
        raise UserError(
            f"{path} is truncated: {size} bytes, its header describes {8 + header_len + data_end} "
            "(an interrupted download or copy?)"
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def shard_set(path: Path) -> list[Path]:
    """All files of the shard set ``path`` belongs to (``x-00001-of-00003.safetensors``), in order.

    A file that is not named like a shard is returned alone. A missing shard is a UserError.
    """
    m = _SHARD_RE.match(path.name)
    if not m:
        return [path]
    width = len(m["index"])
    total = int(m["total"])
    files = [path.with_name(f"{m['stem']}-{i:0{width}d}-of-{m['total']}.safetensors") for i in range(1, total + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path} is one of {total} shards, but {', '.join(missing)} is missing in {path.parent}")
    return files


def shards_from_index(index_path: Path) -> list[Path]:
    """The files listed by a ``*.safetensors.index.json`` weight map, in first-use order."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index_path} is not a valid safetensors index file ({e})") from e
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index_path} lists {', '.join(missing)}, which is missing in {index_path.parent}")
    return files


def is_shard_name(name: str) -> bool:
    return _SHARD_RE.match(name) is not None


class SafetensorsSource:
    """One logical state dict stored in one or more safetensors files.

    ``keys()``/``info()``/``metadata`` come from the headers; ``get()`` reads one tensor. Use as a
    context manager (or call :meth:`close`) to release the memory maps.
    """

    def __init__(self, files: Iterable[Path]):
        self.files: list[Path] = [Path(f) for f in files]
        if not self.files:
            raise ValueError("no files")
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            tensors, metadata = read_header(file)
            for key, info in tensors.items():
                if key in self._infos:
                    raise UserError(f"key {key!r} is stored twice: in {self._infos[key].file} and {file}")
                self._infos[key] = info
            for k, v in metadata.items():
                self.metadata.setdefault(k, v)
        self._fds: dict[Path, int] = {}

    # ---- header data -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def label(self) -> str:
        """How messages name this source: the file, or the first shard and the count."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0]} (+{len(self.files) - 1} more shards)"

    # ---- tensor data -------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise UserError(f"cannot read {file}: {e.strerror or e}") from e
            self._fds[file] = fd
        return fd

    def read(self, key: str, *, pin_memory: bool = False) -> torch.Tensor:
        """Read one tensor in its stored dtype into a new CPU tensor that owns its memory.

        The bytes are copied from the file with ``pread`` (no memory map), so the result never keeps a
        view of the file alive; ``pin_memory=True`` reads straight into page-locked memory.
        """
        info = self._infos[key]
        if info.dtype is None:
            raise UserError(f"{info.file}: tensor {key!r} has dtype {info.dtype_name}, which torch cannot load")
        tensor = torch.empty(info.shape, dtype=info.dtype, pin_memory=pin_memory)
        nbytes = info.stop - info.start
        if nbytes != tensor.numel() * tensor.element_size():
            raise UserError(
                f"{info.file} is corrupt: {key!r} has {nbytes} bytes of data, its dtype and shape need "
                f"{tensor.numel() * tensor.element_size()}"
            )
        if nbytes == 0:
            return tensor
        if sys.byteorder == "big" and tensor.element_size() > 1:
            raise UserError("reading safetensors files on a big-endian machine is not supported")
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(fd, [buffer[done:]], info.start + done)
            except OSError as e:
                raise UserError(f"cannot read {info.file}: {e.strerror or e}") from e
            if n <= 0:
                raise UserError(f"{info.file} is truncated: reading {key!r} ended early")
            done += n
        return tensor

    def get(
        self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Read one tensor; floating-point tensors are cast to ``dtype`` (others keep theirs).

        The result owns its memory (see :meth:`read`).
        """
        tensor = self.read(key)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if tensor.dtype != target or torch.device(device) != tensor.device:
            tensor = tensor.to(device=device, dtype=target)
        return tensor

    def lazy(self, key: str, dtype: torch.dtype | None = None) -> LazyTensor:
        """``key`` as a :class:`LazyTensor` for :func:`save_file_streamed` (read, and cast like :meth:`get`,
        when written)."""
        info = self._infos[key]
        if info.dtype is None:
            raise UserError(f"{info.file}: tensor {key!r} has dtype {info.dtype_name}, which torch cannot load")
        target = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        from tsumugi.models.safetensors_write import LazyTensor

        return LazyTensor(target, info.shape, lambda: self.get(key, dtype))

    def iter_tensors(
        self, keys: Iterable[str] | None = None, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys() if keys is None else keys:
            yield key, self.get(key, dtype, device)

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """Shape-and-dtype stand-ins on the meta device, for dry-running key conversions."""
        out = {}
        for key, info in self._infos.items():
            out[key] = torch.empty(info.shape, dtype=info.dtype or torch.uint8, device="meta")
        return out

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_safetensors(path: str | Path) -> SafetensorsSource:
    """Open a ``.safetensors`` file (expanding shard sets) or a ``*.safetensors.index.json``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.name.endswith(".index.json"):
        return SafetensorsSource(shards_from_index(path))
    return SafetensorsSource(shard_set(path))
