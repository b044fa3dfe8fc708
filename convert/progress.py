"""Progress bars on stderr (tqdm), silent with --quiet."""

from typing import Iterable, Optional


def progress(items: Iterable, total: Optional[int], description: str, quiet: bool) -> Iterable:
    if quiet:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=description, unit="tensor", leave=False)
