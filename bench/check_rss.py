"""By-hand check of bench/_rss.py (not a test: it allocates about 1 GB).

    python3 bench/check_rss.py

Measures, through the launcher, a Python process that fills 200 MB and
prints its own peak (``VmHWM`` from /proc/self/status, just before it exits),
and ``true``; then again while this process holds 700 MB, where waiting on
the command directly (what the benchmarks did) reads this process's 700 MB
for ``true`` too. Exits 1 if a figure is off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rss import measure  # noqa: E402

MB = 1 << 20
ALLOC = (
    "import sys\n"
    "b = b'x' * (200 << 20)\n"  # written, so resident (bytearray(n) would not be)
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print(int(hwm.split()[1]))\n"
)
ALLOC_CMD = [sys.executable, "-c", ALLOC]
TOLERANCE_KIB = 4 * 1024  # the allocator's prints after reading its VmHWM
FLOOR_MAX_KIB = 16 * 1024  # `true` through a `python -I -S` launcher: about 8 MB here


def direct(cmd: list) -> int:
    """The old way: ru_maxrss of a child waited on from this process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss


def alloc(cmd: list) -> tuple[int, int]:
    """(launcher's figure, the allocator's own VmHWM), KiB."""
    r, w = os.pipe()
    code, _, kib = measure(cmd, stdout=w)
    os.close(w)
    with open(r) as f:
        hwm = int(f.read())
    assert code == 0, code
    return kib, hwm


def main() -> None:
    failed = []

    def check(what: str, kib: int, ok: bool, expect: str) -> None:
        print(f"{what:58} {kib / 1024:7.1f} MB   expected {expect}: {'ok' if ok else 'WRONG'}")
        if not ok:
            failed.append(what)

    for holding in (0, 700):
        hold = b"x" * (holding * MB)  # noqa: F841 (resident while the commands run)
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(f"-- this process holds {holding} MB more (its VmHWM: {own / 1024:.0f} MB)")
        kib, hwm = alloc(ALLOC_CMD)
        check(
            "launcher: python filling 200 MB",
            kib,
            abs(kib - hwm) <= TOLERANCE_KIB and hwm >= 200 * 1024,
            f"its own VmHWM {hwm / 1024:.1f} MB",
        )
        kib, hwm = alloc(["sh", "-c", '"$@"; true', "sh", *ALLOC_CMD])
        check(
            "launcher: sh -c 'python filling 200 MB; true'",
            kib,
            abs(kib - hwm) <= TOLERANCE_KIB,
            f"the python's VmHWM {hwm / 1024:.1f} MB",
        )
        kib = measure(["true"])[2]
        check("launcher: true", kib, kib <= FLOOR_MAX_KIB, f"<= {FLOOR_MAX_KIB // 1024} MB")
        kib = measure(["sh", "-c", "tar --version"], stdout=subprocess.DEVNULL)[2]
        check(
            "launcher: sh -c 'tar --version'",
            kib,
            kib <= FLOOR_MAX_KIB,
            f"<= {FLOOR_MAX_KIB // 1024} MB",
        )
        kib = direct(["true"])
        check(
            "old way (wait4 from here): true",
            kib,
            kib >= own - TOLERANCE_KIB,
            f"this process's peak, {own / 1024:.0f} MB (the defect)",
        )
        del hold
    if failed:
        raise SystemExit(f"wrong: {', '.join(failed)}")
    print("all as expected")


if __name__ == "__main__":
    main()
