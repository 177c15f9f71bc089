"""Convert a Qwen-Image / Z-Image LoRA between the Musubi layout and the diffusers/ComfyUI layout.

Musubi-compatible flags (``--input``, ``--output``, ``--target other|default``, ``--diffusers_prefix``,
``--diffusers_adapter_name``) plus ``--architecture`` and ``--keep_alpha``. See ``docs/lora_tools.md``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.commands.lora_tools import convert_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: convert_main(argv))


if __name__ == "__main__":
    sys.exit(main())
