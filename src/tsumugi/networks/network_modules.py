"""The module ``--network_module`` names: Musubi's ``networks.lora_*`` spelling or a full module path.

Resolved while the flags are validated, so a typo, an unsupported network type (LoHa, LoKr, ...) or the
other family's module fails before any model file is read.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tsumugi.errors import UserError
from tsumugi.networks.lora import TargetSpec

KNOWN_MODULES = ("networks.lora_qwen_image", "networks.lora_zimage")
_OTHER_TYPES = ("loha", "lokr", "lycoris", "dylora", "oft", "glora")


def import_network_module(name: str) -> ModuleType:
    """The module with a ``create_network``; :class:`UserError` naming ``name`` otherwise."""
    known = ", ".join(KNOWN_MODULES)
    candidates = [name] + ([f"tsumugi.{name}"] if name.startswith("networks.") else [])
    found = None
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate)
        except (ModuleNotFoundError, ValueError):  # ValueError: an empty or relative name
            continue
        if hasattr(module, "create_network"):
            return module
        found = found or module
    if found is not None:
        raise UserError(f"--network_module {name}: module {found.__name__} has no create_network, so it is not a "
                        f"network module (known: {known})")
    kind = next((k for k in _OTHER_TYPES if k in name.lower()), None)
    if kind is not None:
        raise UserError(f"--network_module {name}: only LoRA networks are supported, not {kind} (use {known})")
    raise UserError(f"--network_module {name}: no such module (known: {known})")


def network_target(module: ModuleType) -> TargetSpec | None:
    """The architecture a network module adapts (None for a module that does not say)."""
    return next((v for v in vars(module).values() if isinstance(v, TargetSpec)), None)
