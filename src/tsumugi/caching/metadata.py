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
) -> dict[str, str]:
    """``controls``: (fingerprint, resized (W, H)) of each control image in order."""
    return {
        "architecture": ARCH_METADATA_NAME[arch_code],
        "width": str(original_size[0]),
        "height": str(original_size[1]),
        "format_version": FORMAT_VERSION,
        **latent_identity(bucket, model_version, vae_identity, source, controls),
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
    arch_code: str, caption: str, model_version: str, encoder_identity: str, controls: list[str]
) -> dict[str, str]:
    return {
        "architecture": ARCH_METADATA_NAME[arch_code],
        "caption1": caption,
        "format_version": FORMAT_VERSION,
        **text_identity(caption, model_version, encoder_identity, controls),
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
