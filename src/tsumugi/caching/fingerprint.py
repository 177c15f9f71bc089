"""Cheap identities for cache staleness checks.

``file_fingerprint`` hashes a source image's bytes (images are read anyway when caching). Caches also
record each source's size and modification time (``stat_token``); a later check hashes a source only
when those changed (:func:`current_fingerprints`), so an unchanged dataset is checked by ``stat`` alone.
``model_identity`` names a model file set by its safetensors headers (every key, dtype, shape and
offset) and sizes: two different checkpoints practically never share it, and computing it reads a few
kilobytes, not the weights.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

RACY_NS = 2_000_000_000
"""A file modified this recently (or later) is not vouched for by its stat: a second same-size write
within the file system's timestamp resolution (2 s on FAT) would leave size and mtime unchanged."""


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def stat_token(path: str | Path) -> str | None:
    """``"<size>:<mtime_ns>"`` of a file, or None while its mtime is too recent to vouch for its content."""
    st = os.stat(path)
    if time.time_ns() - st.st_mtime_ns < RACY_NS:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def fingerprint_with_stat(path: str | Path) -> tuple[str, str | None]:
    """The content hash and the stat token; no token when the file changed while it was being hashed."""
    before = stat_token(path)
    fingerprint = file_fingerprint(path)
    return fingerprint, before if before is not None and stat_token(path) == before else None


def current_fingerprints(
    paths: Sequence[Path],
    recorded: Sequence[str | None] = (),
    recorded_stats: Sequence[str | None] = (),
    *,
    trust_stat: bool = True,
) -> tuple[list[str], list[str | None]]:
    """Fingerprints (and stat tokens to record) of ``paths``.

    A path whose stat token equals the recorded one keeps its recorded fingerprint without being read;
    any other (new, changed, touched, or ``trust_stat=False``) is hashed.
    """
    fingerprints: list[str] = []
    stats: list[str | None] = []
    for i, path in enumerate(paths):
        old = recorded[i] if i < len(recorded) else None
        old_stat = recorded_stats[i] if i < len(recorded_stats) else None
        if trust_stat and old and old_stat and stat_token(path) == old_stat:
            fingerprints.append(old)
            stats.append(old_stat)
        else:
            fingerprint, token = fingerprint_with_stat(path)
            fingerprints.append(fingerprint)
            stats.append(token)
    return fingerprints, stats


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
