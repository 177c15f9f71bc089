"""Z-Image latent caching (Musubi-compatible flags and cache files)."""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.commands.cache import cache_latents_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: cache_latents_main("zimage", argv))


if __name__ == "__main__":
    sys.exit(main())
