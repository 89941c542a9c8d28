"""Bootstrap scripts (``envcrate bootstrap``) on a node without envcrate:
every Python here, every decompressor, every kind of store, the cache shared
with ``envcrate ensure``, many processes at once, kills, and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import envcrate, ok
from servers import HttpServer, wait_for

from envcrate.stores import blob_key, open_store

CLI = [sys.executable, "-m", "envcrate.cli"]


def _pythons() -> "list[Path]":
    """pyenv's CPythons 3.6 and later."""
    root = (
        shutil.which("pyenv")
        and subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    )
    found = []
    for d in sorted(Path(root or "/nonexistent", "versions").glob("3.*")):
        exe = d / "bin" / "python3"
        if exe.is_file() and tuple(map(int, d.name.split(".")[:2])) >= (3, 6):
            found.append(exe)
    return found


PYTHONS = _pythons()
PY36 = next((p for p in PYTHONS if "/3.6." in str(p)), None)


def events_in(report: Path) -> "list[dict]":
    out = []
    for f in sorted(report.glob("*.jsonl")) if report.is_dir() else []:
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def sh(script: Path, *args, env: dict, timeout: float = 120, **kw):
    return subprocess.run(
        ["sh", str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def entries(cache: Path) -> "list[str]":
    e = cache / "e"
    return sorted(os.listdir(e)) if e.is_dir() else []


@pytest.fixture(scope="session")
def gz_crate(small_venv, tmp_path_factory):
    from envcrate import pack

    return pack(small_venv, tmp_path_factory.mktemp("gz"), format="tar.gz")


@pytest.fixture
def store(small_crate, gz_crate, tmp_path) -> Path:
    """A directory store of this test's own with both archives of the small crate."""
    s = open_store(str(tmp_path / "store"))
    for c, fmt in ((small_crate, "tar.zst"), (gz_crate, "tar.gz")):
        s.publish(c.archive, c.manifest.data, fmt, c.blob, c.size, tag="small")
    return tmp_path / "store"


def make_script(ref, out: Path, env: dict, *args) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    done = envcrate("bootstrap", ref, "-o", out, *map(str, args), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    return out


@pytest.fixture
def script(store, tmp_path, env) -> Path:
    return make_script(
        "small", tmp_path / "boot.sh", env, "--store", store, "--cache", tmp_path / "cache",
        "--report", tmp_path / "report",
    )  # fmt: skip


def bare_env(env: dict, tmp_path: Path, **extra) -> dict:
    """A node's environment: no PYTHONPATH, no envcrate settings, a HOME of its own."""
    e = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    e["HOME"] = str(tmp_path / "home")
    e["TMPDIR"] = str(tmp_path)  # the scripts' start markers: this test's own
    e.update(extra)
    return e


def tools_without(tmp_path: Path, *missing: str) -> str:
    """A PATH of this machine's tools (those a script and the node code use)
    without ``missing``: a node where they are not installed."""
    d = tmp_path / f"bin-without-{'-'.join(missing)}"
    d.mkdir(exist_ok=True)
    for tool in ("sh", "touch", "mkdir", "rm", "date", "uname", "grep", "sed", "python3.11"):
        found = shutil.which(tool, path="/usr/bin:/bin")
        if found and tool not in missing and not (d / tool).exists():
            (d / tool).symlink_to(found)
    return str(d)


# --------------------------------------------------------------------- pythons


@pytest.mark.skipif(not PYTHONS, reason="pyenv's Pythons are not installed")
@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: p.parent.parent.name)
def test_the_cold_path_runs_under_every_python(python, script, small_crate, tmp_path, env):
    """The embedded compute side under each Python (3.6 without zstandard:
    the zstd command), then the warm path under none at all."""
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    cold = sh(script, "run", "--", "python", "-c", "import six, sys; print(sys.prefix)", env=node)
    assert cold.returncode == 0, cold.stderr
    prefix = cold.stdout.strip()
    assert prefix.startswith(str(tmp_path / "cache" / "e" / small_crate.id[7:23]))
    states = [e["state"] for e in events_in(tmp_path / "report")]
    assert states[-1] == "READY" and "FAILED" not in states, states
    # Warm: no Python can start (none on PATH, none named), and it still works.
    warm_env = dict(node, PATH=tools_without(tmp_path, "python3.11"), ENVCRATE_BOOT_PYTHON="/none")
    warm = sh(script, "prefix", env=warm_env)
    assert warm.returncode == 0 and warm.stdout.strip() == prefix, warm.stderr
    assert [e["state"] for e in events_in(tmp_path / "report")][-1] == "HIT"


def test_isolated_and_minimal_environments(script, tmp_path, env):
    """`python3 -I` as the node's Python (a wrapper), and `env -i` with only
    PATH: no HOME, no cache settings (the script's --cache is used)."""
    wrapper = tmp_path / "python3-isolated"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -I "$@"\n')
    wrapper.chmod(0o755)
    done = sh(script, "prefix", env=bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(wrapper)))
    assert done.returncode == 0, done.stderr
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    bare = {"PATH": "/usr/bin:/bin"}
    done = sh(script, "run", "--", "python", "-c", "import six; print(six.__name__)", env=bare)
    assert done.returncode == 0 and done.stdout.strip() == "six", done.stderr


# ---------------------------------------------------------------- decompressors


def _damage(store: Path, blob: str) -> None:
    """Flip a byte of the blob's content (a new file: the store may share the
    archive's inode with the session's crate)."""
    p = store / blob_key(blob)
    data = bytearray(p.read_bytes())
    data[-200] ^= 0xFF  # in the last body frame (not in padding zstd skips)
    tmp = p.with_name(p.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, p)


@pytest.mark.skipif(PY36 is None, reason="no Python 3.6 from pyenv")
def test_without_any_zstd_decompressor_the_tar_gz_archive_is_used(
    script, store, small_crate, tmp_path, env
):
    """Python 3.6 (no zstandard), no zstd command: the tar.gz archive. The
    tar.zst blob is damaged, so using it would fail the digest check."""
    _damage(store, small_crate.blob)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(PY36))
    node["PATH"] = tools_without(tmp_path, "zstd")
    done = sh(script, "prefix", env=node)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "bin" / "python").exists()


def test_the_zstd_command_and_compression_zstd(script, tmp_path, env):
    """Each fallback alone reads the tar.zst archive (compression.zstd: the
    backports.zstd module, the same API as Python 3.14's)."""
    pytest.importorskip("backports.zstd")
    for i, backend in enumerate(["command", "compression.zstd"]):
        node = bare_env(
            env, tmp_path, ENVCRATE_ZSTD=backend, ENVCRATE_CACHE=str(tmp_path / f"c{i}")
        )
        node["ENVCRATE_BOOT_PYTHON"] = sys.executable
        done = sh(script, "prefix", env=node)
        assert done.returncode == 0, (backend, done.stderr)
        assert done.stdout.startswith(str(tmp_path / f"c{i}" / "e"))


@pytest.mark.skipif(PY36 is None, reason="no Python 3.6 from pyenv")
def test_no_decompressor_and_no_tar_gz_says_what_to_install(small_crate, tmp_path, env):
    only_zst = tmp_path / "zst-store"
    c = small_crate
    open_store(str(only_zst)).publish(c.archive, c.manifest.data, "tar.zst", c.blob, c.size)
    boot = make_script(c.id, tmp_path / "b.sh", env, "--store", only_zst, "--cache",
                       tmp_path / "cache", "--report", tmp_path / "report")  # fmt: skip
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(PY36))
    node["PATH"] = tools_without(tmp_path, "zstd")
    done = sh(boot, "prefix", env=node)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "no zstd decompressor" in line and "tar.gz" in line
    failed = [e for e in events_in(tmp_path / "report") if e["state"] == "FAILED"]
    assert failed and "zstd" in failed[0]["error"]
    assert entries(tmp_path / "cache") == []


# ----------------------------------------------------------------- activation


@pytest.mark.parametrize("shell", ["dash", "bash", "zsh"])
def test_sourcing_activates_and_deactivate_undoes_it(shell, script, tmp_path, env):
    if not shutil.which(shell):
        pytest.skip(f"no {shell}")
    code = (
        "set -- job-argument; "  # a job script's own arguments are not a mode
        f". {script} || exit 9; "
        'echo "VE=$VIRTUAL_ENV"; command -v python; ls "$VIRTUAL_ENV/../../leases"/*; '
        'deactivate; echo "after=${VIRTUAL_ENV-unset} $(command -v python || echo none)"; '
        "set | grep -c '^_envcrate' || true"
    )
    node = bare_env(env, tmp_path, PATH=f"{tmp_path / 'nopy'}:/usr/bin:/bin")
    for attempt in ("cold", "warm"):
        done = subprocess.run([shell, "-c", code], env=node, capture_output=True, text=True)
        assert done.returncode == 0, (attempt, done.stderr)
        lines = done.stdout.splitlines()
        prefix = lines[0].split("=", 1)[1]
        assert prefix.startswith(str(tmp_path / "cache" / "e")), lines
        assert lines[1] == f"{prefix}/bin/python"
        assert lines[2].endswith(f".{lines[2].rsplit('.', 1)[1]}")  # the shell's lease (its pid)
        assert lines[3].startswith("after=unset") and prefix not in lines[3]
        assert lines[4] == "0", f"{attempt}: variables left behind: {done.stdout}"
    leases = list((tmp_path / "cache" / "leases").glob("*/*"))
    assert leases == [], leases  # both shells' leases went with deactivate


def test_run_gives_the_command_its_exit_status_and_a_lease(script, tmp_path, env):
    node = bare_env(env, tmp_path)
    done = sh(script, "run", "--", "sh", "-c", "ls ../../leases/*/ >/dev/null; exit 7", env=node)
    assert done.returncode == 7, done.stderr
    code = "import os; print(os.getppid())"  # the script's pid: its shell exec'd `sh -c`
    leased = sh(script, "run", "--", "sh", "-c", f"ls {tmp_path}/cache/leases/*/; python -c '{code}'", env=node)  # fmt: skip
    assert leased.returncode == 0, leased.stderr
    *names, pid = leased.stdout.split()
    assert any(n.endswith(f".{pid}") for n in names), (names, pid)


def test_usage_errors(script, tmp_path, env):
    node = bare_env(env, tmp_path)
    for args, words in [
        ((), "source this script"),
        (("frobnicate",), "unknown mode 'frobnicate'"),
        (("run",), "run -- COMMAND"),
    ]:
        done = sh(script, *args, env=node)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert words in done.stderr
    helped = sh(script, "--help", env=node)
    assert helped.returncode == 0 and "boot.sh prefix" in helped.stdout


# -------------------------------------------------------------------- stores


def test_http_store_and_a_staged_archive(store, small_crate, tmp_path, env):
    server = HttpServer(store)
    try:
        boot = make_script("small", tmp_path / "h" / "boot.sh", env, "--store", server.url,
                           "--cache", tmp_path / "cache")  # fmt: skip
        done = sh(boot, "prefix", env=bare_env(env, tmp_path))
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    # The server is gone: a fresh cache fails with one line (after retrying
    # for ENVCRATE_NETWORK_DEADLINE seconds), nothing made.
    node = bare_env(env, tmp_path, ENVCRATE_CACHE=str(tmp_path / "fresh"))
    down = sh(boot, "prefix", env=dict(node, ENVCRATE_NETWORK_DEADLINE="2"))
    assert down.returncode == 1 and len(down.stderr.splitlines()) == 1, down.stderr
    assert "127.0.0.1" in down.stderr and entries(tmp_path / "fresh") == []
    # --stage puts the archives beside the script, found there without the store.
    staged = make_script("small", tmp_path / "s" / "boot.sh", env, "--store", store, "--stage")
    assert sorted(p.name for p in staged.parent.iterdir() if p.name != "boot.sh") == [
        f"small-{small_crate.id[7:19]}.tar.gz", f"small-{small_crate.id[7:19]}.tar.zst"
    ]  # fmt: skip
    shutil.rmtree(store)
    done = sh(staged, "prefix", env=node)
    assert done.returncode == 0, done.stderr
    # ... or in $ENVCRATE_BOOT_DIR, for a script sourced from elsewhere
    moved = tmp_path / "elsewhere.sh"
    shutil.copy(staged, moved)
    node2 = dict(
        node, ENVCRATE_CACHE=str(tmp_path / "fresh2"), ENVCRATE_BOOT_DIR=str(staged.parent)
    )
    assert sh(moved, "prefix", env=node2, cwd=tmp_path).returncode == 0


def test_presigned_s3_needs_no_credentials_and_expires(small_crate, seaweed, s3_env, tmp_path, env):
    url = f"s3://{seaweed.bucket()}/boot-{tmp_path.name}"
    c = small_crate
    open_store(url).publish(c.archive, c.manifest.data, "tar.zst", c.blob, c.size, tag="small")
    client = {**env, **s3_env}
    plain = envcrate("bootstrap", "small", "--store", url, "-o", tmp_path / "x.sh", env=client)
    assert plain.returncode == 1 and "--presign" in plain.stderr
    boot = make_script("small", tmp_path / "boot.sh", client, "--store", url, "--presign", "600",
                       "--cache", tmp_path / "cache", "--report", tmp_path / "report")  # fmt: skip
    node = bare_env(env, tmp_path)  # no AWS_* at all
    done = sh(boot, "prefix", env=node)
    assert done.returncode == 0, done.stderr
    assert client["AWS_SECRET_ACCESS_KEY"] not in boot.read_text()
    # Expired: a fresh cache fails with one line naming the refusal.
    import urllib.request

    boot = make_script("small", tmp_path / "short.sh", client, "--store", url, "--presign", "1",
                       "--report", tmp_path / "report")  # fmt: skip
    config = _config(boot)
    link = config["archives"][0]["urls"][0]

    def expired() -> bool:
        try:
            urllib.request.urlopen(link, timeout=5).close()
            return False
        except OSError:
            return True

    wait_for(expired, 30, "the presigned URL did not expire")
    late = sh(boot, "prefix", env=dict(node, ENVCRATE_CACHE=str(tmp_path / "late"),
                                       ENVCRATE_NETWORK_DEADLINE="5"))  # fmt: skip
    assert late.returncode == 1 and len(late.stderr.splitlines()) == 1, late.stderr
    assert "403" in late.stderr or "denied" in late.stderr.lower(), late.stderr
    assert entries(tmp_path / "late") == []
    assert [e for e in events_in(tmp_path / "report") if e["state"] == "FAILED"]


def _config(script: Path) -> dict:
    import base64

    encoded = script.read_text().split('_CONFIG = json.loads(binascii.a2b_base64("', 1)[1]
    return json.loads(base64.b64decode(encoded.split('"', 1)[0]))


# ----------------------------------------------------------- the shared cache


def test_ensure_and_bootstrap_share_one_cache_in_both_orders(store, small_crate, tmp_path, env):
    cache = tmp_path / "cache"
    boot = make_script("small", tmp_path / "boot.sh", env, "--store", store, "--cache", cache)
    node = bare_env(env, tmp_path)
    # ensure first, then the script: a warm hit (no Python allowed)
    first = ok(envcrate("ensure", "small", "--store", store, "--cache", cache, "--json", env=env))
    warm_env = dict(node, PATH=tools_without(tmp_path, "python3.11"), ENVCRATE_BOOT_PYTHON="/none")
    hit = sh(boot, "prefix", env=warm_env)
    assert hit.returncode == 0 and hit.stdout.strip() == first["prefix"], hit.stderr
    # the script first, then ensure: a hit; `ls` and `verify` know the entry
    other = tmp_path / "other"
    filled = sh(boot, "prefix", env=dict(node, ENVCRATE_CACHE=str(other)))
    assert filled.returncode == 0, filled.stderr
    again = ok(envcrate("ensure", small_crate.id, "--cache", other, "--json", env=env))
    assert again["state"] == "HIT" and again["prefix"] == filled.stdout.strip()
    verified = envcrate("verify", small_crate.id, "--cache", other, "--json", env=env)
    assert json.loads(verified.stdout)["ok"] is True, verified.stdout


def test_gc_keeps_what_a_script_has_leased_and_removes_it_after(script, tmp_path, env):
    node = bare_env(env, tmp_path)
    held = subprocess.Popen(
        ["sh", str(script), "run", "--", "sh", "-c", "echo up; read line"],
        env=node, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert held.stdout.readline().strip() == "up"
        gc = envcrate("gc", "--cache", tmp_path / "cache", "--max-size", "0", "--json", env=env)
        assert gc.returncode == 0 and len(entries(tmp_path / "cache")) == 1, gc.stdout
    finally:
        held.communicate("\n", timeout=30)
    assert held.returncode == 0
    gc = envcrate("gc", "--cache", tmp_path / "cache", "--max-size", "0", "--json", env=env)
    assert gc.returncode == 0 and entries(tmp_path / "cache") == [], gc.stdout


def test_a_warm_script_leaves_an_entry_being_removed_to_the_python_path(script, tmp_path, env):
    """gc marks the lease directory while it decides: the sh warm path then
    does not take the entry on its own word, the cold path (under the use
    lock) does."""
    node = bare_env(env, tmp_path)
    assert sh(script, "prefix", env=node).returncode == 0
    [key] = entries(tmp_path / "cache")
    marked = tmp_path / "cache" / "leases" / key / ".removing"
    marked.parent.mkdir(parents=True, exist_ok=True)
    marked.touch()
    before = len(events_in(tmp_path / "report"))
    done = sh(script, "run", "--", "true", env=node)
    assert done.returncode == 0, done.stderr
    states = [e["state"] for e in events_in(tmp_path / "report")[before:]]
    assert states[0] == "RESOLVING" and "HIT" in states, states  # Python's path, not sh's


def test_32_concurrent_scripts_fill_the_cache_once(script, small_crate, tmp_path, env):
    node = bare_env(env, tmp_path)
    filled_once(32, ["sh", str(script), "prefix"], node, tmp_path, env)
    evs = events_in(tmp_path / "report")
    assert sum(e["state"] == "EXTRACTING" for e in evs) == 1, evs


def filled_once(n: int, cmd: list, node: dict, tmp_path: Path, env: dict, started=None) -> None:
    """Run ``cmd`` ``n`` times at once (``started``: called once all are):
    all print the one entry the cache got, and the report has one READY, no
    FAILED, a row for each."""
    procs = [
        subprocess.Popen(cmd, env=node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    if started is not None:
        started()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1 and len(entries(tmp_path / "cache")) == 1
    totals = json.loads(envcrate("report", tmp_path / "report", "--json", env=env).stdout)["totals"]
    assert totals["READY"] == 1 and totals["FAILED"] == 0, totals
    assert totals["READY"] + totals["WAITED"] + totals["HIT"] == n, totals


def counting_python(tmp_path: Path) -> "tuple[Path, Path]":
    """A Python that logs each start: (the wrapper, the log)."""
    log = tmp_path / "python-starts"
    wrapper = tmp_path / "counting-python"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >>{log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def test_concurrent_scripts_start_one_python_the_others_wait_in_sh(
    script, small_crate, tmp_path, env
):
    """32 scripts at once, none finding the crate: one starts Python (the
    start marker in $TMPDIR names it), the others poll the warm path in sh
    while it lives."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    # all start, then wait at a gate: the crate is surely not ready before all look
    gate = tmp_path / "gate"
    gated = f"while [ ! -e {gate} ]; do sleep 0.01; done; exec sh {script} prefix"
    filled_once(32, ["sh", "-c", gated], node, tmp_path, env, started=gate.touch)
    starts = log.read_text().split()
    assert 1 <= len(starts) <= 2, f"{len(starts)} Pythons started for 32 scripts"
    assert not list(tmp_path.glob(".envcrate-boot.*")), "the start marker was left behind"


def _marker(tmp_path: Path, crate_id: str, pid: int, start: str, caches: str) -> Path:
    host = Path("/proc/sys/kernel/hostname").read_text().strip()
    m = tmp_path / f".envcrate-boot.{crate_id.split(':')[1][:16]}.{os.getuid()}"
    m.write_text(f"{host}\n{pid}\n{start}\n{caches}\n")
    return m


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_a_script_waits_in_sh_while_the_starter_lives(script, small_crate, tmp_path, env):
    """The marker names a live process: the script starts no Python and
    returns once the crate is ready (filled here by envcrate ensure)."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    starter = subprocess.Popen(["sleep", "300"])
    try:
        cache = str(tmp_path / "cache")
        _marker(tmp_path, small_crate.id, starter.pid, _start_time(starter.pid), cache)
        waiting = subprocess.Popen(
            ["sh", str(script), "prefix"], env=node, stdout=subprocess.PIPE, text=True
        )
        wait_for(lambda: _marker_read(waiting.pid), 30, "the script did not reach its wait")
        assert waiting.poll() is None and not log.exists()
        filled = envcrate(
            "ensure", small_crate.id, "--cache", cache, "--store", tmp_path / "store", env=env
        )
        assert filled.returncode == 0, filled.stderr
        out, _ = waiting.communicate(timeout=60)
        assert waiting.returncode == 0 and out.strip() == filled.stdout.strip()
        assert not log.exists(), "a waiting script started Python"
        report = envcrate("report", tmp_path / "report", "--json", env=env)
        assert json.loads(report.stdout)["totals"]["WAITED"] == 1, report.stdout
    finally:
        starter.kill()
        starter.wait()


def test_a_fifo_at_the_marker_s_name_does_not_hang_the_script(script, small_crate, tmp_path, env):
    """Another user can put anything at the marker's name in a shared /tmp:
    the marker is linked into place, never opened for writing."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    m = tmp_path / f".envcrate-boot.{small_crate.id.split(':')[1][:16]}.{os.getuid()}"
    os.mkfifo(m)
    done = sh(script, "prefix", env=node, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(log.read_text().split()) == 1 and m.exists()  # it ran Python; the FIFO stays


def test_a_starter_that_never_fills_is_waited_for_ten_seconds_at_most(
    script, small_crate, tmp_path, env
):
    """A marker naming a live process whose Python never takes the lock (no
    holder file appears; e.g. a sourced script interrupted, its shell still
    there): after 10 s the waiter removes it and fills itself."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    other = subprocess.Popen(["sleep", "300"])
    try:
        cache = str(tmp_path / "cache")
        m = _marker(tmp_path, small_crate.id, other.pid, _start_time(other.pid), cache)
        done = sh(script, "prefix", env=node, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(log.read_text().split()) == 1 and not m.exists()
    finally:
        other.kill()
        other.wait()


def test_a_marker_naming_this_very_shell_is_stale(script, small_crate, tmp_path, env):
    """Left by `. boot.sh` interrupted in this shell: sourcing again must
    not wait for itself."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    cache = str(tmp_path / "cache")
    host = Path("/proc/sys/kernel/hostname").read_text().strip()
    m = tmp_path / f".envcrate-boot.{small_crate.id.split(':')[1][:16]}.{os.getuid()}"
    code = (
        f"st=$(cut -d' ' -f22 /proc/$$/stat); printf '%s\\n%s\\n%s\\n%s\\n' {host} $$ \"$st\" "
        f'{cache} > {m} && . {script} && echo "ok $VIRTUAL_ENV"'
    )
    done = subprocess.run(
        ["bash", "-c", code], env=node, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok " + cache) and len(log.read_text().split()) == 1


def _marker_read(pid: int) -> bool:
    """The shell of ``pid`` sleeps between looks at the warm path."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    return any(Path(f"/proc/{k}/comm").read_text().strip() == "sleep" for k in kids)


@pytest.mark.parametrize("which", ["dead", "reused pid", "other caches"])
def test_a_marker_that_names_no_live_starter_is_passed_over(
    which, script, small_crate, tmp_path, env
):
    """A starter killed with SIGKILL leaves its marker; its pid may since
    name another process; a marker for other caches is another election."""
    python, log = counting_python(tmp_path)
    node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
    other = subprocess.Popen(["sleep", "300"])
    try:
        cache = str(tmp_path / "cache")
        if which == "dead":
            other.kill()
            other.wait()
            m = _marker(tmp_path, small_crate.id, other.pid, "12345", cache)
        elif which == "reused pid":
            m = _marker(tmp_path, small_crate.id, other.pid, "12345", cache)
        else:
            m = _marker(tmp_path, small_crate.id, other.pid, _start_time(other.pid), "/else")
        done = sh(script, "prefix", env=node, timeout=60)  # not the 600 s a live starter gets
        assert done.returncode == 0, done.stderr
        assert len(log.read_text().split()) == 1  # it ran Python itself
        assert m.exists() == (which == "other caches")  # a stale one is replaced, then removed
    finally:
        other.kill()
        other.wait()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_sigkill_during_the_cold_path_then_a_clean_retry(script, small_crate, tmp_path, env):
    node = bare_env(env, tmp_path)
    victim = subprocess.Popen(
        ["sh", str(script), "prefix"], env=dict(node, ENVCRATE_TEST_STOP_AT="EXTRACTING"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:

        def stopped_python():
            stopped = [
                e["pid"] for e in events_in(tmp_path / "report") if e["state"] == "EXTRACTING"
            ]
            return stopped and _stopped(stopped[0]) and stopped[0]

        wait_for(stopped_python, 60, "the filler did not stop at EXTRACTING")
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    cache = tmp_path / "cache"
    assert [n for n in entries(cache) if not n.startswith(".")] == []  # nothing looks ready
    again = sh(script, "prefix", env=node)
    assert again.returncode == 0, again.stderr
    assert [n for n in entries(cache) if n.startswith(".")] == []  # the leftover is cleaned
    verified = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
    assert json.loads(verified.stdout)["ok"] is True


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_a_failed_event_and_nothing_half_made(
    script, store, small_crate, tmp_path, env
):
    # a wrong ref, at bootstrap time
    wrong = envcrate("bootstrap", "nosuchtag", "--store", store, "-o", tmp_path / "w.sh", env=env)
    assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1
    assert not (tmp_path / "w.sh").exists()
    node = bare_env(env, tmp_path)
    # no usable Python on the node
    nopy = dict(node, PATH=tools_without(tmp_path, "python3.11"), ENVCRATE_BOOT_PYTHON="/none")
    done = sh(script, "prefix", env=nopy)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "no Python 3.6 or later" in done.stderr
    # a cache that cannot be made (under a file)
    (tmp_path / "file").write_text("")
    done = sh(script, "prefix", env=dict(node, ENVCRATE_CACHE=str(tmp_path / "file" / "c")))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    # a damaged archive in the store: the digest check refuses it
    for a in _config(script)["archives"]:
        _damage(store, a["blob"])
    done = sh(script, "prefix", env=node)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "digest" in done.stderr or "corrupt" in done.stderr, done.stderr
    assert [n for n in entries(tmp_path / "cache") if not n.startswith(".")] == []
    failed = [e for e in events_in(tmp_path / "report") if e["state"] == "FAILED"]
    assert len(failed) == 3 and all(e.get("error") for e in failed), failed
    shown = envcrate("report", tmp_path / "report", env=env)
    assert shown.returncode == 1 and "3 FAILED" in shown.stdout


def test_verify_finds_an_altered_activation_profile(script, small_crate, tmp_path, env):
    """What the warm path sources is checked by `verify --cache` like the
    entry's files (a group member could plant an entry with its own)."""
    assert sh(script, "prefix", env=bare_env(env, tmp_path)).returncode == 0
    cache = tmp_path / "cache"
    verified = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
    assert json.loads(verified.stdout)["ok"] is True, verified.stdout
    [key] = entries(cache)
    profile = cache / "e" / key / ".envcrate" / "activate.sh"
    profile.chmod(0o644)
    profile.write_text(profile.read_text() + "echo planted\n")
    verified = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
    [report] = json.loads(verified.stdout)["entries"]
    assert report["ok"] is False and report["modified"] == [".envcrate/activate.sh"], report
    assert verified.returncode == 1 and "activate.sh" in verified.stderr


def test_an_s3_report_from_the_cold_and_the_warm_path(
    script, store, seaweed, s3_env, tmp_path, env
):
    """With credentials on the node, events go to an s3:// report; the warm
    path, which sh cannot sign for, hands its HIT to Python."""
    report = f"s3://{seaweed.bucket()}/report-{tmp_path.name}"
    boot = make_script("small", tmp_path / "s3.sh", env, "--store", store,
                       "--cache", tmp_path / "cache", "--report", report)  # fmt: skip
    node = bare_env({**env, **s3_env}, tmp_path)
    for _ in ("cold", "warm"):
        done = sh(boot, "prefix", env=node)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    shown = envcrate("report", report, "--json", env={**env, **s3_env})
    assert shown.returncode == 0, shown.stderr
    totals = json.loads(shown.stdout)["totals"]
    assert (totals["READY"], totals["HIT"], totals["FAILED"]) == (1, 1, 0), totals


def test_a_store_with_only_the_tar_gz_archive(gz_crate, tmp_path, env):
    c = gz_crate
    only_gz = tmp_path / "gz-store"
    open_store(str(only_gz)).publish(c.archive, c.manifest.data, "tar.gz", c.blob, c.size)
    boot = make_script(c.id, tmp_path / "gz.sh", env, "--store", only_gz,
                       "--cache", tmp_path / "cache")  # fmt: skip
    assert [a["format"] for a in _config(boot)["archives"]] == ["tar.gz"]
    for python in [sys.executable, *([PY36] if PY36 else [])]:
        node = bare_env(env, tmp_path, ENVCRATE_BOOT_PYTHON=str(python))
        node["ENVCRATE_CACHE"] = str(tmp_path / f"c-{Path(python).parent.parent.name}")
        done = sh(boot, "run", "--", "python", "-c", "import six", env=node)
        assert done.returncode == 0, (python, done.stderr)


# ------------------------------------------------------- found by a review


def test_the_cold_path_imports_nothing_from_the_current_directory(script, tmp_path, env):
    """`python -` puts the current directory first on sys.path: a json.py
    left in a job's directory must not run."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "json.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    (job / "zlib.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    done = sh(script, "prefix", env=bare_env(env, tmp_path), cwd=job)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_stale_removing_mark_still_leaves_the_shell_a_lease(script, tmp_path, env):
    """A gc killed while it decided leaves leases/<key>/.removing: the
    script then takes the Python path, which must lease the shell."""
    node = bare_env(env, tmp_path)
    assert sh(script, "prefix", env=node).returncode == 0
    [key] = entries(tmp_path / "cache")
    leases = tmp_path / "cache" / "leases" / key
    leases.mkdir(parents=True, exist_ok=True)
    (leases / ".removing").touch()
    done = subprocess.run(
        ["sh", "-c", f". {script} && ls -a {leases} && echo pid=$$"],
        env=node, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pid = done.stdout.split("pid=")[1].strip()
    assert any(n.endswith(f".{pid}") for n in done.stdout.split()), done.stdout


def test_lease_directories_made_by_the_script_are_group_writable_in_a_shared_cache(
    store, tmp_path, env
):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    boot = make_script("small", tmp_path / "b.sh", env, "--store", store, "--cache", shared)
    node = bare_env(env, tmp_path)
    assert sh(boot, "prefix", env=node).returncode == 0
    [key] = entries(shared)
    shutil.rmtree(shared / "leases", ignore_errors=True)
    done = sh(boot, "run", "--", "true", env=node)
    assert done.returncode == 0, done.stderr
    for d in (shared / "leases", shared / "leases" / key):
        assert d.stat().st_mode & 0o7777 == 0o2775, (d, oct(d.stat().st_mode))


def test_a_tilde_cache_is_refused(store, tmp_path, env):
    out = envcrate("bootstrap", "small", "--store", store, "--cache", "~/c", "-o", tmp_path / "b.sh", env=env)  # fmt: skip
    assert out.returncode == 1 and "$HOME" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.skipif(not shutil.which("dash"), reason="no dash")
def test_a_dash_job_script_s_arguments_do_not_pick_a_mode(script, tmp_path, env):
    job = tmp_path / "job.sh"
    job.write_text(f'. {script} || exit 9\necho "active $VIRTUAL_ENV"\n')
    for args in (["run", "--", "echo", "X"], ["prefix"], ["help"]):
        done = subprocess.run(["dash", str(job), *args], env=bare_env(env, tmp_path),
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.startswith(f"active {tmp_path / 'cache' / 'e'}"), (args, done.stdout)


def test_a_staged_file_of_the_wrong_size_is_passed_over(script, tmp_path, env):
    """Junk under the staged name (in the current directory, say) is not
    read for minutes: the store's copy is used."""
    job = tmp_path / "job"
    job.mkdir()
    for a in _config(script)["archives"]:
        with open(job / a["staged"], "wb") as f:
            f.truncate(50 << 30)  # sparse
    done = sh(script, "prefix", env=bare_env(env, tmp_path), cwd=job, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_record_name_cannot_inject_into_the_script(small_crate, tmp_path, env):
    c = small_crate
    data = dict(c.manifest.data, name="x@LOADER@y")
    s = tmp_path / "store"
    open_store(str(s)).publish(c.archive, data, "tar.zst", c.blob, c.size)
    boot = make_script(c.id, tmp_path / "b.sh", env, "--store", s, "--cache", tmp_path / "c")
    done = sh(boot, "prefix", env=bare_env(env, tmp_path))
    assert done.returncode == 0, done.stderr


def test_gc_removes_what_a_killed_shell_or_gc_left_in_a_lease_directory(script, tmp_path, env):
    node = bare_env(env, tmp_path)
    assert sh(script, "run", "--", "true", env=node).returncode == 0
    [key] = entries(tmp_path / "cache")
    d = tmp_path / "cache" / "leases" / key
    old = time.time() - 7200
    for name in (".lease.abcdefgh", ".removing", ".lease.fresh123"):
        (d / name).touch()
    for name in (".lease.abcdefgh", ".removing"):
        os.utime(d / name, (old, old))
    gc = envcrate("gc", "--cache", tmp_path / "cache", "--json", env=env)
    assert gc.returncode == 0, gc.stderr
    assert sorted(n for n in os.listdir(d) if n.startswith(".")) == [".lease.fresh123"]


def test_an_entry_planted_beside_the_real_one_does_not_shadow_it(
    script, small_crate, tmp_path, env
):
    """A cache member may add `e/<id16>` (a conda-style name sorting first)
    with a ready marker naming the crate: neither the script nor `ensure`
    takes it over the real entry, whose files hash to the crate id."""
    node = bare_env(env, tmp_path)
    real = sh(script, "prefix", env=node).stdout.strip()
    cache = tmp_path / "cache"
    planted = cache / "e" / small_crate.id[7:23]
    (planted / ".envcrate").mkdir(parents=True)
    (planted / ".envcrate" / "ready").write_text(f'{small_crate.id}\n\n\n{{"id": "x"}}')
    (planted / ".envcrate" / "activate.sh").write_text("echo planted\n")
    hit = sh(script, "prefix", env=node)
    assert hit.returncode == 0 and hit.stdout.strip() == real, hit.stdout
    ensured = ok(envcrate("ensure", small_crate.id, "--cache", cache, "--json", env=env))
    assert ensured["prefix"] == real
    # verify reports the planted one instead of failing on its marker
    verified = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
    assert "Traceback" not in verified.stderr, verified.stderr
