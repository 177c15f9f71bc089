"""Merge LoRA files into a Qwen-Image or Z-Image DiT and save it as one ComfyUI-layout safetensors file.

Musubi's ``merge_lora`` flags (``--dit``, ``--lora_weight``, ``--lora_multiplier``, ``--save_merged_model``,
``--device``; its HunyuanVideo-only ``--dit_in_channels`` is accepted and ignored) plus ``--architecture``
and ``--save_dtype``. See ``docs/lora_tools.md``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.commands.lora_tools import merge_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: merge_main(argv))


if __name__ == "__main__":
    sys.exit(main())
