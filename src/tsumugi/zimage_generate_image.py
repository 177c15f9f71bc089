"""Z-Image text-to-image generation (Musubi-compatible flags)."""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tsumugi.cli.script_path import fix_sys_path

    fix_sys_path(__file__)

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.sample.generate import generate_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: generate_main("zimage", argv))


if __name__ == "__main__":
    sys.exit(main())
