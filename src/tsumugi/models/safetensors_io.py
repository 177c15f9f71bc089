"""Reading and writing safetensors files: single files, shard sets, index files.

Reading is lazy: :func:`open_safetensors` parses only the JSON headers (keys, dtypes, shapes, data
offsets, metadata), so detection and config derivation never touch tensor data. Tensors are then read
one at a time with ``pread`` into memory they own (no memory map: nothing read can keep the file mapped)
and cast to the requested dtype as each is read.

We parse the header ourselves (8-byte little-endian length + JSON) to check a file before handing it to
safetensors: a truncated download or a non-safetensors file becomes a :class:`UserError` naming the
file instead of a Rust panic message.

Writing: :func:`save_file_atomic` hands a dict of tensors to the safetensors library;
:func:`save_file_streamed` writes the same bytes from :class:`LazyTensor` entries (dtype + shape known up
front, data produced one tensor at a time), so a large model can be written, cast or re-laid-out on the
way, without holding a second copy of it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.errors import UserError

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


# ---- writing -------------------------------------------------------------------------------------
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


def replace_atomic(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    try:
        save_file(_prepare_for_save(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        replace_atomic(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    try:
        with open(tmp, "wb") as f:
            f.write(header)
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
            expected = len(header) + sum(_nbytes(s.dtype, s.shape) for s in specs.values())
            if f.tell() != expected:
                raise RuntimeError(f"{tmp}: wrote {f.tell()} bytes, the header describes {expected}")
        replace_atomic(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
