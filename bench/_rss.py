"""Wall time and peak RSS of one command, its own and not the benchmark's.

Why a launcher: on Linux a child's ``ru_maxrss`` does not start at zero. A
forked child's memory is a copy of its parent's, and at exec the kernel
folds the old memory's high-water mark into the process's ``maxrss``, which
the new program then keeps (``subprocess`` vforks, so the old memory is the
parent's own and the mark is the parent's peak so far). Waiting on a tool
started straight from a benchmark that holds 740 MB therefore reads 740 MB
for ``tar`` and for everything else.

So each command is started by a fresh, small launcher (``python -I -S``, which
imports only modules built into the interpreter) that spawns it, waits for it
with ``wait4`` and reports that rusage. The launcher's own ``maxrss`` carries
the benchmark's mark, but a process's mark is not passed on to its children:
what the tool starts from is the launcher's memory, about 8 MB. ``wait4``
gives the maximum over the tool and all its descendants that were waited for
(``zstd`` under ``tar -I``, ``python`` under ``sh -c``, forked workers), each
process's own peak; not a sum over processes running at once.

The figure is therefore max(tool's own peak, launcher floor): a tool that
peaks below the floor shows the floor. ``floor_kib()`` measures it (``true``
through the launcher) so the benchmarks can print it.

Not chosen: reading ``VmHWM`` from ``/proc/PID/status``. It is per memory,
reset at exec, so it has no floor, but it is gone once the process exits,
so it must be polled (missing a peak at the end) and it covers one process,
not ``tar``'s ``zstd`` or ``sh -c``'s commands.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Runs as ``python -I -S -c _LAUNCHER FD CMD...``. ``time`` and ``_signal`` are
# built into the interpreter (no import from disk, nothing added to the
# floor). The tool gets the launcher's environment (the one the benchmark
# passed), its working directory and standard streams; SIGPIPE and SIGXFSZ
# back to their defaults, as subprocess's restore_signals does (Python ignores
# them). The report goes to FD, closed in the tool. Timing runs from the
# spawn to the wait, so the launcher's own start-up is not counted.
_LAUNCHER = """\
import os, sys, time, _signal
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ,
                      setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - start
os.write(fd, b"%d %r %d" % (os.waitstatus_to_exitcode(status), elapsed, usage.ru_maxrss))
"""


def measure(cmd: list, **popen_kw) -> tuple[int, float, int]:
    """Run ``cmd`` through the launcher: (exit code, wall seconds, peak RSS
    in KiB of the largest process in its tree). ``popen_kw`` (env, cwd,
    stdout, ...) apply to the launcher and so to the command."""
    r, w = os.pipe()
    try:
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(w), *map(str, cmd)],
            pass_fds=(w,),
            **popen_kw,
        )
    finally:
        os.close(w)
    with open(r, "rb") as f:
        report = f.read()
    if launcher.wait() != 0 or not report:
        raise SystemExit(f"launcher failed ({launcher.returncode}): {' '.join(map(str, cmd))}")
    code, seconds, kib = report.split()
    return int(code), float(seconds), int(kib)


def floor_kib() -> int:
    """What the launcher reports for a command that allocates nothing."""
    return measure(["true"])[2]


def floor_note() -> str:
    """The line the benchmarks print under their peak RSS columns."""
    return (
        "peak RSS: of the largest single process of each command (its descendants "
        "included), read through a fresh launcher; a command that peaks below "
        f"{floor_kib() / 1024:.0f} MB (the launcher's floor: `true` through it) shows that"
    )
