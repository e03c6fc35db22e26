"""`--check-data`: decode every image of a dataset before training, in parallel, and list every
problem at once, so a corrupt validation image is not found only after a whole epoch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from engine.errors import DataError


def check_images(paths: Sequence[str], decode: Callable[[str], object], workers: int, log) -> None:
    """Decode each path (torchvision's decoders release the GIL, so threads run in parallel); raise a
    DataError listing every file that fails (decode raises DataError naming the file and the reason)."""
    log.info(f"--check-data: decoding {len(paths)} images with {max(workers, 1)} threads")

    def problem(path: str) -> str | None:
        try:
            decode(path)
        except DataError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        problems = [p for p in pool.map(problem, paths, chunksize=64) if p is not None]
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"--check-data: {len(problems)} of {len(paths)} images cannot be used:\n  "
                        + "\n  ".join(problems[:50]) + more)
    log.info(f"--check-data: all {len(paths)} images decode")
