"""Architecture adapters: one per model family, behind :class:`tsumugi.arch.base.Architecture`."""

from __future__ import annotations

from tsumugi.arch.base import Architecture


def get_architecture(name: str) -> Architecture:
    """``qwen_image`` or ``zimage``."""
    if name == "qwen_image":
        from tsumugi.arch.qwen_image import QwenImageArchitecture

        return QwenImageArchitecture()
    if name == "zimage":
        from tsumugi.arch.zimage import ZImageArchitecture

        return ZImageArchitecture()
    raise ValueError(f"unknown architecture {name!r}; expected 'qwen_image' or 'zimage'")
