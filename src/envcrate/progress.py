"""Progress bars on stderr for long work (only on a terminal or when asked)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Callable


def wanted(flag: bool | None) -> bool:
    """``--progress`` forces bars; otherwise only when stderr is a terminal."""
    return bool(flag) or (flag is None and sys.stderr.isatty())


@contextlib.contextmanager
def bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        mininterval=0.25,
        leave=False,
    ) as t:
        yield t.update
