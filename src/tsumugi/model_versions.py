"""Qwen-Image model versions and Musubi's flags that pick one (``--model_version``, ``--edit``, ``--edit_plus``)."""

from __future__ import annotations

from typing import Any

from tsumugi.errors import UserError

MODEL_VERSIONS = ("original", "edit", "edit-2509", "edit-2511", "layered")
EDIT_VERSIONS = ("edit", "edit-2509", "edit-2511")


def resolve_model_version(args: Any) -> str:
    """Musubi's order: explicit --model_version, else --edit_plus, else --edit, else original.

    ``args`` is anything with those attributes (parsed flags or a run configuration)."""
    if getattr(args, "model_version", None):
        version = args.model_version.lower()
        if version not in MODEL_VERSIONS:
            raise UserError(f"--model_version: {args.model_version!r} is not one of {', '.join(MODEL_VERSIONS)}")
        return version
    if getattr(args, "edit_plus", False):
        return "edit-2509"
    if getattr(args, "edit", False):
        return "edit"
    return "original"
