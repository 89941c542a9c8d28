"""Reports: the events of processes on compute nodes, sent where the client
can read them (design.md, Report), and read back into one row per process.

A report location is a directory (a path or ``file://`` URL) or an
``s3://bucket/prefix``. It holds one object per process (per
:class:`ReportSink`), named ``<host>.<pid>.<start>.jsonl`` (``start``: when
the sink was made, integer nanoseconds since the epoch), whose lines are that
process's events, the same JSON lines as ``--events FILE``. One writer per
object: nothing is shared between processes, so nothing needs a lock or an
atomic append across hosts (NFS has none).

The sink must never fail the work it reports on: the first failure to send
prints one warning line and the sink stops trying. It runs on bare nodes
under Python 3.6 with the standard library only, and imports nothing beyond
``os`` and ``time`` until it sends (JSON is not even parsed: it sends the
lines it is given). The reader (:class:`Reader`) takes whatever it finds as
hostile: a line that is not an event is counted and skipped, an object that
is not a regular file, or is larger than :data:`MAX_OBJECT`, is not read.
"""

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
OUTCOMES = ("HIT", "READY", "WAITED", "FAILED", "running")
PHASES = {"DOWNLOADING": "downloading", "EXTRACTING": "extracting", "RELOCATING": "relocating"}

MAX_OBJECT = 16 << 20  # bytes read of one object: a process writes a few KiB
MAX_LINE = 64 << 10  # an event line longer than this is not parsed
SUFFIX = ".jsonl"
REPORT_TIMEOUT = 10.0  # seconds one PUT may stall: a report must not hold up the work

_last_start = [0]


def object_name(host: "str | None" = None, pid: "int | None" = None, start=None) -> str:
    """``<host>.<pid>.<start>.jsonl`` for this process (or the given parts).
    Successive calls in one process get distinct, increasing starts."""
    if host is None:
        host = os.uname().nodename  # as socket.gethostname(), without importing socket
    host = host.replace("/", "_") or "unknown"
    if pid is None:
        pid = os.getpid()
    if start is None:
        # time.time_ns is 3.7; a float's 240 ns grain could repeat a start
        start = max(int(time.time() * 1e9), _last_start[0] + 1)
        _last_start[0] = start
    return "%s.%d.%d%s" % (host, pid, start, SUFFIX)


def parse_name(name: str) -> "tuple[str, int, int] | None":
    """``(host, pid, start)`` of an object name, or None if it is not one."""
    if not name.endswith(SUFFIX):
        return None
    parts = name[: -len(SUFFIX)].rsplit(".", 2)  # a host name may hold dots
    if len(parts) != 3 or not parts[0] or "/" in parts[0]:
        return None
    host, pid, start = parts
    if not (_digits(pid) and _digits(start)) or len(pid) > 10 or len(start) > 24:
        return None
    return host, int(pid), int(start)


def _digits(s: str) -> bool:
    return bool(s) and all("0" <= c <= "9" for c in s)


def report_directory(url: str) -> "str | None":
    """The local directory of a report URL (a path or ``file://``), None for
    ``s3://``; ValueError for anything else."""
    if url.startswith("s3://"):
        return None
    if url.startswith("file://"):
        path = url[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path.startswith("/"):
            raise ValueError("a file:// URL must name a local path (file:///path)")
        if "%" in path:
            from urllib.parse import unquote

            path = unquote(path)
        return path
    if "://" in url:
        raise ValueError("a report is a directory, a file:// URL or an s3://bucket/prefix")
    return url


# --------------------------------------------------------------------------- the sink


class ReportSink:
    """Sends one process's event lines to the report at ``url``: appended to
    its own file in a directory, or PUT whole again after each event to its
    own S3 object (so a reader never sees half of one)."""

    def __init__(self, url: "str | os.PathLike"):
        self.url = os.fspath(url)
        self.name = object_name()
        self.failed = False
        self._created = False
        self._lines = []  # S3: everything sent so far, PUT again each time

    def send(self, line: bytes) -> None:
        """Send ``line`` (one JSON object and ``\\n``). Never raises for a
        failure to send: warns once on stderr and stops sending."""
        if self.failed:
            return
        try:
            directory = report_directory(self.url)
            if directory is None:
                self._lines.append(line)
                self._put(b"".join(self._lines))
            else:
                self._append(directory, line)
        except Exception as e:  # whatever it is, the work it reports on goes on
            self.failed = True
            self._lines = []
            import sys

            sys.stderr.write(
                "envcrate: warning: cannot send events to %s: %s\n" % (self.url, _reason(e))
            )
            sys.stderr.flush()

    # -- a directory

    def _append(self, directory: str, line: bytes) -> None:
        path = os.path.join(directory, self.name)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            if not self._created:
                self._created = True
                self._share(fd, directory)
            os.write(fd, line)  # one write: a reader sees whole lines
        finally:
            os.close(fd)

    @staticmethod
    def _share(fd: int, directory: str) -> None:
        """A group-writable directory is a shared one: let the group read."""
        if os.stat(directory).st_mode & 0o020:
            mode = os.fstat(fd).st_mode & 0o777
            if not mode & 0o040:
                os.fchmod(fd, mode | 0o040)

    # -- S3

    def _put(self, body: bytes) -> None:
        import urllib.request

        url, headers = s3_put_request(self.url, self.name, body, dict(os.environ))
        request = urllib.request.Request(url, data=body, headers=headers, method="PUT")
        with urllib.request.urlopen(request, timeout=_timeout()) as answer:
            answer.read()


def _timeout() -> float:
    """``ENVCRATE_NETWORK_TIMEOUT`` when it is shorter than the report's own
    10 s (a bad value is ignored: the sink never fails)."""
    try:
        value = float(os.environ.get("ENVCRATE_NETWORK_TIMEOUT") or REPORT_TIMEOUT)
    except ValueError:
        value = REPORT_TIMEOUT
    return value if 0 < value < REPORT_TIMEOUT else REPORT_TIMEOUT


def _reason(e: Exception) -> str:
    """One line saying why a send failed."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        code = ""
        try:
            body = e.read(4096).decode("utf-8", "replace")
            if "<Code>" in body:
                code = " " + body.split("<Code>", 1)[1].split("</Code>", 1)[0]
        except Exception:
            pass
        return "HTTP %d%s" % (e.code, code or " " + str(e.reason))
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (" (%s)" % e.filename if e.filename else "")
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def s3_put_request(url: str, name: str, body: bytes, env: dict) -> "tuple[str, dict]":
    """The URL and headers of a path-style PUT of ``body`` as ``name`` under
    ``url`` (``s3://bucket/prefix``), signed with AWS Signature V4 from the
    credentials in ``env`` (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``). Nodes have no AWS configuration files to read:
    the environment is all there is."""
    import hashlib
    import hmac
    from urllib.parse import quote, urlsplit

    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError("the URL names no bucket; write s3://BUCKET/PREFIX")
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise ValueError("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = (
        env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or "https://s3.%s.amazonaws.com" % region
    )
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("the S3 endpoint %s is not an http(s) URL" % endpoint)
    prefix = prefix.strip("/")
    key = prefix + "/" + name if prefix else name
    path = quote("%s/%s/%s" % (parts.path.rstrip("/"), bucket, key), safe="/~")

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    day = stamp[:8]
    payload = hashlib.sha256(body).hexdigest()
    headers = {
        "content-type": "application/x-ndjson",
        "host": parts.netloc,
        "x-amz-content-sha256": payload,
        "x-amz-date": stamp,
    }
    token = env.get("AWS_SESSION_TOKEN")
    if token:
        headers["x-amz-security-token"] = token
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join(
        ["PUT", path, "", "".join("%s:%s\n" % (k, headers[k].strip()) for k in names)]
        + [signed, payload]
    )
    scope = "%s/%s/s3/aws4_request" % (day, region)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, digest])
    k = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s"
        % (
            access,
            scope,
            signed,
            signature,
        )
    )
    return "%s://%s%s" % (parts.scheme, parts.netloc, path), headers


# --------------------------------------------------------------------------- the reader


def parse_events(data: bytes) -> "tuple[list, int]":
    """The events among ``data``'s lines, in order, and how many lines were
    not events (not a JSON object, no known state, no finite ``ts``)."""
    import json

    events, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE:
            bad += 1
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            bad += 1
            continue
        event = _event(obj)
        if event is None:
            bad += 1
        else:
            events.append(event)
    return events, bad


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e15


def _event(obj) -> "dict | None":
    """The fields of an event that have the right types, or None."""
    if not isinstance(obj, dict) or obj.get("state") not in STATES or not _number(obj.get("ts")):
        return None
    event = {"state": obj["state"], "ts": float(obj["ts"])}
    if _number(obj.get("seconds")):
        event["seconds"] = float(obj["seconds"])
    for key in ("crate", "ref", "prefix", "error", "url", "store"):
        if isinstance(obj.get(key), str):
            event[key] = obj[key][:4096]
    if _number(obj.get("bytes")):
        event["bytes"] = int(obj["bytes"])
    return event


def summarize(events: list, host: str, pid: int, start: int, name: str = "") -> dict:
    """One process's row: its last state and outcome (``running`` until a
    HIT, READY or FAILED; WAITED for a READY filled by another process while
    this one waited), the seconds it spent downloading, extracting and
    relocating (each phase until the next event; one not finished yet is not
    counted), its total ``seconds`` (the last event's that has them), the error of a FAILED
    one and the prefix of a ready one. A process that ensured several times
    sums its phases; its state and outcome are the last ensure's."""
    row = {
        "object": name,
        "host": host,
        "pid": pid,
        "start": start / 1e9,
        "crate": None,
        "ref": None,
        "state": None,
        "outcome": "running",
        "downloading": None,
        "extracting": None,
        "relocating": None,
        "seconds": None,
        "error": None,
        "prefix": None,
        "bytes": None,
        "source": None,
        "events": len(events),
        "last": None,
    }
    waited = False
    for i, e in enumerate(events):
        state = e["state"]
        if state == "RESOLVING":
            waited = False
            row.update(crate=None, ref=e.get("ref"), prefix=None, error=None)
        elif state == "WAITING":
            waited = True
        elif state in ("DOWNLOADING", "EXTRACTING"):
            waited = False  # the holder went away and this process fills it itself
        phase = PHASES.get(state)
        if phase and i + 1 < len(events):
            spent = max(0.0, events[i + 1]["ts"] - e["ts"])
            row[phase] = round((row[phase] or 0.0) + spent, 6)
        if e.get("crate"):
            row["crate"] = e["crate"]
        if "seconds" in e:
            row["seconds"] = e["seconds"]
        if state == "DOWNLOADING":
            row["source"] = e.get("url") or e.get("store")
            row["bytes"] = e.get("bytes")
        if state in ("READY", "HIT") and e.get("prefix"):
            row["prefix"] = e["prefix"]
    if events:
        last = events[-1]
        row.update(state=last["state"], last=last["ts"])
        if last["state"] == "FAILED":
            row.update(outcome="FAILED", error=last.get("error"))
        elif last["state"] == "READY":
            row["outcome"] = "WAITED" if waited else "READY"
        elif last["state"] == "HIT":
            row["outcome"] = "HIT"
    return row


def totals(rows: list, unreadable: int = 0, skipped: int = 0) -> dict:
    """How many processes, on how many hosts, ended in each outcome."""
    out = {"processes": len(rows), "hosts": len({r["host"] for r in rows})}
    for outcome in OUTCOMES:
        out[outcome] = sum(1 for r in rows if r["outcome"] == outcome)
    out["unreadable"] = unreadable + sum(r.get("unreadable", 0) for r in rows)
    out["skipped"] = skipped
    return out


class Reader:
    """Reads the report at ``url`` again and again (``--follow``), parsing
    only the objects that changed since the last read. A directory is read
    here; an ``s3://`` report through ``store`` (a
    :class:`envcrate.stores.Store`: its ``walk`` and ``read``), which the
    caller opens: this package never imports the stores."""

    def __init__(self, url: str, store=None):
        self.url = url
        self.directory = report_directory(url)
        if self.directory is None and store is None:
            raise ValueError("reading an s3:// report needs its store (open_store(url))")
        self.store = store
        self.skipped = 0  # objects of the last read that are not event files
        self._seen = {}  # name -> (version, row)

    def read(self) -> list:
        """One row per process, by host then start. A missing directory is
        FileNotFoundError (NotADirectoryError for a file)."""
        found = self._directory() if self.store is None else self._bucket()
        self._seen = found
        rows = [row for _, row in found.values() if row is not None]
        self.skipped = sum(1 for _, row in found.values() if row is None)
        rows.sort(key=lambda r: (r["host"], r["start"], r["pid"]))
        return rows

    def totals(self, rows: list) -> dict:
        return totals(rows, skipped=self.skipped)

    def _row(self, name: str, data: bytes) -> "dict | None":
        parsed = parse_name(name)
        events, bad = parse_events(data)
        if parsed is None or not events:
            return None
        row = summarize(events, parsed[0], parsed[1], parsed[2], name)
        row["unreadable"] = bad
        return row

    def _directory(self) -> dict:
        import stat

        found = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                version = (st.st_ino, st.st_size, st.st_mtime_ns)
                if parse_name(name) is None or not stat.S_ISREG(st.st_mode):
                    found[name] = (version, None)
                elif name in self._seen and self._seen[name][0] == version:
                    found[name] = self._seen[name]
                else:
                    data = _read_regular(os.path.join(self.directory, name))
                    found[name] = (version, self._row(name, data) if data is not None else None)
        return found

    def _bucket(self) -> dict:
        listed = self.store.walk("")
        found, wanted = {}, []
        for o in listed:
            version = (o.size, o.mtime)
            if "/" in o.key or parse_name(o.key) is None or o.size > MAX_OBJECT:
                found[o.key] = (version, None)
            elif o.key in self._seen and self._seen[o.key][0] == version:
                found[o.key] = self._seen[o.key]
            else:
                wanted.append((o.key, version))
        if wanted:
            from concurrent.futures import ThreadPoolExecutor

            # the store's client exists now (walk made it): its calls are thread-safe
            with ThreadPoolExecutor(8) as pool:
                datas = list(pool.map(lambda kv: self.store.read(kv[0], MAX_OBJECT), wanted))
            for (key, version), data in zip(wanted, datas):
                if data is not None:  # else removed since the listing
                    found[key] = (version, self._row(key, data))
        return found


def _read_regular(path: str) -> "bytes | None":
    """At most :data:`MAX_OBJECT` bytes of ``path`` if it is a regular file
    (not through a symlink: a planted link to /etc/shadow is not followed;
    not a FIFO, whose open would wait for a writer), else None."""
    import stat

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], MAX_OBJECT
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_report(url: str, store=None) -> list:
    """The rows of the report at ``url`` (see :func:`summarize`); ``store``
    for an ``s3://`` one (see :class:`Reader`)."""
    return Reader(url, store).read()
