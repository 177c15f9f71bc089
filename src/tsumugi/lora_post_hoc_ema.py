"""Post-hoc EMA of saved LoRA checkpoints (Musubi's ``lora_post_hoc_ema`` flags).

See ``docs/lora_tools.md``; the work is done by :func:`tsumugi.networks.lora_ema.post_hoc_ema`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.commands.lora_tools import ema_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: ema_main(argv))


if __name__ == "__main__":
    sys.exit(main())
