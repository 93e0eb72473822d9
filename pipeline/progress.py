"""Progress bars for long loops: tqdm on a terminal, silent when piped or with --quiet."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_quiet = os.environ.get("GLR_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (the CLI's --quiet)."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar (rate and ETA) when a person is watching."""
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True))
