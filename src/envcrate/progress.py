"""Progress bars on stderr for long work (only on a terminal or when asked).

Cheap to import: the warm ``ensure`` path imports it (no contextlib, no
typing, tqdm only when a bar is shown, and no bar where it is missing)."""

import sys


def wanted(flag: "bool | None") -> bool:
    """``--progress`` forces bars; otherwise only when stderr is a terminal."""
    return bool(flag) or (flag is None and sys.stderr.isatty())


class bar:
    """``with bar(total, desc, enabled) as tick:`` gives ``tick(n)`` to report
    progress, or None when no bar is shown."""

    def __init__(self, total: "int | None", desc: str, enabled: bool):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # a bare node (a bootstrap script): no bar
            return None

        self._bar = tqdm(
            total=self.total,
            desc=self.desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            mininterval=0.25,
            leave=False,
        )
        return self._bar.update

    def set_total(self, total: int) -> None:
        """The total, once it is known (a bar may start without one)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
