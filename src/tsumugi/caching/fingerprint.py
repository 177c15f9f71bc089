"""Cheap identities for cache staleness checks.

``file_fingerprint`` hashes a source image's bytes (images are read anyway when caching).
``model_identity`` names a model file set by its safetensors headers (every key, dtype, shape and
offset) and sizes: two different checkpoints practically never share it, and computing it reads a few
kilobytes, not the weights.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return raw
        (length,) = struct.unpack("<Q", raw)
        return f.read(min(length, 64 << 20))


def model_identity(path: str | Path) -> str:
    """``<name>:<sha256 of headers and sizes>`` for a file, a shard set's first shard, or a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    else:
        stem = path.name.split("-00001-of-")[0] if "-00001-of-" in path.name else None
        files = sorted(path.parent.glob(f"{stem}-0*-of-*.safetensors")) if stem else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        digest.update(_safetensors_header(file) if file.suffix == ".safetensors" else file.read_bytes())
    return f"{path.name}:{digest.hexdigest()[:16]}"
