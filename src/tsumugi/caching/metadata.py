"""What a cache file says about its origin, and how a reader decides it is stale.

Musubi's keys (``architecture``, ``width``, ``height``, ``caption1``, ``format_version``) are written
unchanged. tsumugi adds ``tsumugi.*`` keys; a cache without them (e.g. made by Musubi) is accepted
with what can be checked (name, shape), one with different values is stale.
"""

from __future__ import annotations

import json

import tsumugi
from tsumugi.caching.cache_files import ARCH_METADATA_NAME, FORMAT_VERSION


def latent_metadata(
    arch_code: str,
    original_size: tuple[int, int],
    bucket: tuple[int, int],
    model_version: str,
    vae_identity: str,
    source: str,
    controls: list[tuple[str, tuple[int, int]]],
    stats: list[str | None] | None = None,
) -> dict[str, str]:
    """``controls``: (fingerprint, resized (W, H)) of each control image in order; ``stats``: the stat
    tokens of the target and each control (see ``fingerprint.stat_token``)."""
    return {
        "architecture": ARCH_METADATA_NAME[arch_code],
        "width": str(original_size[0]),
        "height": str(original_size[1]),
        "format_version": FORMAT_VERSION,
        **latent_identity(bucket, model_version, vae_identity, source, controls),
        "tsumugi.stats": json.dumps(stats or []),
        "tsumugi.version": tsumugi.__version__,
    }


def latent_identity(
    bucket: tuple[int, int],
    model_version: str,
    vae_identity: str,
    source: str,
    controls: list[tuple[str, tuple[int, int]]],
) -> dict[str, str]:
    """The ``tsumugi.*`` keys that must match for a latent cache to be current."""
    return {
        "tsumugi.model_version": model_version,
        "tsumugi.bucket": f"{bucket[0]}x{bucket[1]}",
        "tsumugi.vae": vae_identity,
        "tsumugi.source": source,
        "tsumugi.controls": json.dumps([[fp, f"{w}x{h}"] for fp, (w, h) in controls]),
    }


def text_metadata(
    arch_code: str,
    caption: str,
    model_version: str,
    encoder_identity: str,
    controls: list[str],
    stats: list[str | None] | None = None,
) -> dict[str, str]:
    """``stats``: stat tokens of the control images fed to the VL encoder."""
    return {
        "architecture": ARCH_METADATA_NAME[arch_code],
        "caption1": caption,
        "format_version": FORMAT_VERSION,
        **text_identity(caption, model_version, encoder_identity, controls),
        "tsumugi.stats": json.dumps(stats or []),
        "tsumugi.version": tsumugi.__version__,
    }


def text_identity(caption: str, model_version: str, encoder_identity: str, controls: list[str]) -> dict[str, str]:
    """``controls``: fingerprints of the control images fed to the VL encoder (edit versions)."""
    from tsumugi.caching.fingerprint import text_fingerprint

    return {
        "tsumugi.caption": text_fingerprint(caption),
        "tsumugi.model_version": model_version,
        "tsumugi.text_encoder": encoder_identity,
        "tsumugi.controls": json.dumps(controls),
    }


def text_uses_images(arch_code: str, model_version: str) -> bool:
    """Edit versions feed the control images to the VL encoder: the text cache depends on them too."""
    return arch_code == "qie" and model_version not in ("original", "layered")


def _json_list(metadata: dict[str, str], key: str) -> list:
    try:
        value = json.loads(metadata.get(key, "[]"))
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def recorded_latent_sources(metadata: dict[str, str]) -> tuple[list[str | None], list[str | None]]:
    """(fingerprints, stat tokens) a latent cache recorded for its target and control images."""
    controls = [c[0] if isinstance(c, list) and c else None for c in _json_list(metadata, "tsumugi.controls")]
    return [metadata.get("tsumugi.source"), *controls], _json_list(metadata, "tsumugi.stats")


def recorded_text_sources(metadata: dict[str, str]) -> tuple[list[str | None], list[str | None]]:
    """(fingerprints, stat tokens) a text cache recorded for the control images of an Edit version."""
    return _json_list(metadata, "tsumugi.controls"), _json_list(metadata, "tsumugi.stats")


def header_problems(found: dict[str, str], arch_code: str) -> list[str]:
    """Musubi's own keys: a cache of another architecture or of another (e.g. a future) format is refused."""
    expected = {"architecture": ARCH_METADATA_NAME[arch_code], "format_version": FORMAT_VERSION}
    return [
        f"{key} is {found[key]!r}, expected {value!r}" if key in found else f"{key} is missing, expected {value!r}"
        for key, value in expected.items()
        if found.get(key) != value
    ]
