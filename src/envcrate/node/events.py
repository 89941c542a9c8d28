"""Bootstrap events: one JSON object per line appended to ``--events FILE``,
the feedback channel from a compute node back to the client (design.md,
Events). Each line is written with a single ``write`` on an ``O_APPEND``
descriptor, so lines of concurrent processes do not interleave."""

import os
import time

STATES = (
    "RESOLVING",
    "HIT",
    "WAITING",
    "DOWNLOADING",
    "VERIFYING",
    "EXTRACTING",
    "RELOCATING",
    "READY",
    "FAILED",
)


# Fault injection for the tests: a process stops itself (SIGSTOP) right after
# writing this state, so a test can kill it at a known point.
_STOP_AT = os.environ.get("ENVCRATE_TEST_STOP_AT")


class Events:
    """``path``: the events file; ``report``: a report location (a directory
    or ``s3://`` prefix, :mod:`.report`) that gets the same lines."""

    def __init__(self, path: "str | os.PathLike | None", report: "str | None" = None):
        self.path = os.fspath(path) if path is not None else None
        self.start = time.monotonic()
        self.crate: str | None = None
        self.report = None
        if report:
            from .report import ReportSink

            self.report = ReportSink(report)

    def emit(self, state: str, **fields) -> None:
        if self.path is None and self.report is None:
            return
        record = {
            "ts": time.time(),
            "host": os.uname().nodename,  # as socket.gethostname(), without importing socket
            "pid": os.getpid(),
            "crate": self.crate,
            "state": state,
            "seconds": round(time.monotonic() - self.start, 6),
        }
        record.update({k: v for k, v in fields.items() if v is not None})
        import json

        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        if self.report is not None:
            self.report.send(line)  # never raises: a report must not fail the work
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        if state == _STOP_AT:
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)
