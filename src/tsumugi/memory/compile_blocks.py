"""``--compile``: ``torch.compile`` of each transformer block's ``forward``.

Only ``block.forward`` is replaced by its compiled version; ``block.__call__`` (and with it the forward
hooks of block swap and the ``gradient_checkpointing_func`` call around the block) stays eager, so the
compiled code sees one block's computation and nothing else. With block swap the Linear forwards inside
the blocks run eagerly (``torch._dynamo.disable``): their weights change device and identity between
calls, which would make every call recompile.
"""

from __future__ import annotations

from typing import Any

import torch

# blocks compiled one by one, per architecture
COMPILE_BLOCKS: dict[str, tuple[str, ...]] = {
    "qwen_image": ("transformer_blocks",),
    "zimage": ("noise_refiner", "context_refiner", "layers"),
}

_DYNAMIC = {None: None, "auto": None, "true": True, "false": False, True: True, False: False}


def compiled_blocks(dit: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    if arch not in COMPILE_BLOCKS:
        raise ValueError(f"compile: unknown architecture {arch!r}; expected one of {sorted(COMPILE_BLOCKS)}")
    return [block for attr in COMPILE_BLOCKS[arch] for block in (getattr(dit, attr, None) or [])]


def compile_blocks(
    dit: torch.nn.Module,
    arch: str,
    *,
    backend: str = "inductor",
    mode: str | None = "default",
    dynamic: str | bool | None = None,
    fullgraph: bool = False,
    cache_size_limit: int | None = None,
    eager_linears: bool = False,
) -> list[torch.nn.Module]:
    """Compile the blocks of ``dit`` in place; ``eager_linears`` keeps Linear forwards out (block swap)."""
    if dynamic not in _DYNAMIC:
        raise ValueError(f"compile: dynamic must be true, false or auto, not {dynamic!r}")
    if cache_size_limit is not None:
        torch._dynamo.config.cache_size_limit = cache_size_limit
    options: dict[str, Any] = {"backend": backend, "dynamic": _DYNAMIC[dynamic], "fullgraph": fullgraph}
    if mode and mode != "default":
        options["mode"] = mode
    blocks = compiled_blocks(dit, arch)
    for block in blocks:
        if eager_linears:
            for module in block.modules():
                if type(module).__name__.endswith("Linear"):
                    module.forward = torch._dynamo.disable(module.forward)
        block.forward = torch.compile(block.forward, **options)
    return blocks
