"""Conda envs: real environments installed offline by py-rattler from a local
channel of packages built here, packed, ensured elsewhere and run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conda_channel import (
    PLACEHOLDER,
    Pkg,
    build,
    index,
    install,
    placeholder_program,
    python_package,
    site_packages,
)
from conftest import WHEELHOUSE, check, envcrate, text_files_naming
from conftest import install as pip_install

from envcrate import pack
from envcrate.crate.manifest import short_id

SPECS = ["python", "tool", "purepy"]


@pytest.fixture(scope="session")
def channel(tmp_path_factory) -> Path:
    """A channel with python (made from this CPython), ``tool`` (text and
    binary placeholders, a script with a prefix shebang, a symlink, an ELF
    where a C compiler exists) and ``purepy`` (noarch: python)."""
    root = tmp_path_factory.mktemp("channel")
    ch = root / "channel"
    build(python_package(), ch)
    files = {
        "share/greeting.txt": b"hello from tool\n",
        "etc/tool.conf": f"prefix={PLACEHOLDER}\ndata={PLACEHOLDER}/share\n".encode(),
        "bin/tool-script": f"#!{PLACEHOLDER}/bin/python\nimport sys\nprint(sys.prefix)\n".encode(),
        "lib/libgreeting.txt": ("link", "../share/greeting.txt"),
    }
    placeholders = {"etc/tool.conf": "text", "bin/tool-script": "text"}
    elf = placeholder_program(root)
    if elf is not None:
        files["bin/where"] = elf
        placeholders["bin/where"] = "binary"
    build(
        Pkg(
            "tool",
            "2.0",
            files=files,
            placeholders=placeholders,
            executables={"bin/tool-script", "bin/where"},
            depends=["python"],
        ),
        ch,
    )
    build(
        Pkg(
            "purepy",
            "0.3",
            files={
                "site-packages/purepy/__init__.py": b"X = 42\n",
                "site-packages/purepy-0.3.dist-info/METADATA": b"Name: purepy\nVersion: 0.3\n",
                "python-scripts/purepy-run": b"#!/usr/bin/env python\nimport purepy\nprint(purepy.X)\n",
            },
            executables={"python-scripts/purepy-run"},
            depends=["python"],
            noarch_python=True,
        ),
        ch,
    )
    index(ch)
    return ch


@pytest.fixture(scope="session")
def pkgs_dir(tmp_path_factory) -> Path:
    """One package cache for the session: conda-pack reads managed files from it."""
    return tmp_path_factory.mktemp("pkgs")


@pytest.fixture(scope="session")
def conda_env(channel, pkgs_dir, tmp_path_factory) -> Path:
    """The shared conda env, with six pip-installed on top, a variable in
    conda-meta/state and activate.d and deactivate.d scripts. Tests must not
    modify it."""
    prefix = install(channel, tmp_path_factory.mktemp("envs") / "shared", SPECS, pkgs_dir)
    pip_install(prefix, ["six"])
    (prefix / "conda-meta" / "state").write_text(json.dumps({"env_vars": {"TOOL_MODE": "fast"}}))
    activate_d = prefix / "etc" / "conda" / "activate.d"
    activate_d.mkdir(parents=True)
    (activate_d / "tool.sh").write_text('export TOOL_HOME="$CONDA_PREFIX/share"\n')
    deactivate_d = prefix / "etc" / "conda" / "deactivate.d"
    deactivate_d.mkdir(parents=True)
    (deactivate_d / "tool.sh").write_text('unset TOOL_HOME; echo "left $CONDA_PREFIX"\n')
    return prefix


@pytest.fixture(scope="session")
def conda_crate(conda_env, tmp_path_factory):
    return pack(conda_env, tmp_path_factory.mktemp("conda-crate"))


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{out.args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _fresh_env(channel, pkgs_dir, path: Path) -> Path:
    return install(channel, path, SPECS, pkgs_dir)


def _has_elf(prefix: Path) -> bool:
    return (prefix / "bin" / "where").exists()


def test_manifest_lists_placeholders_pins_and_python(conda_crate, conda_env, channel):
    m = conda_crate.manifest
    assert m.kind == "conda"
    assert m.python["version"].startswith("3.")
    files = {r["path"]: r for r in m.prefix_files}
    assert files["etc/tool.conf"] == {
        "path": "etc/tool.conf",
        "placeholder": PLACEHOLDER,
        "mode": "text",
    }
    assert files["bin/tool-script"]["mode"] == "text"
    if _has_elf(conda_env):
        assert files["bin/where"] == {
            "path": "bin/where",
            "placeholder": PLACEHOLDER,
            "mode": "binary",
        }
    conda = {p["name"]: p for p in m.pins if p["kind"] == "conda"}
    assert set(conda) == {"python", "tool", "purepy"}
    tool_file = channel / "linux-64" / "tool-2.0-0.conda"
    assert conda["tool"]["md5"] == hashlib.md5(tool_file.read_bytes()).hexdigest()
    assert conda["tool"]["sha256"] == hashlib.sha256(tool_file.read_bytes()).hexdigest()
    assert conda["purepy"]["subdir"] == "noarch"
    pip = [p for p in m.pins if p["kind"] != "conda"]
    assert [p["name"] for p in pip] == ["six"]  # purepy's dist-info is conda's, not pip's


def test_pins_print_an_explicit_list_and_pip_requirements(conda_crate, channel):
    out = ok(envcrate("info", conda_crate.archive, "--pins")).stdout.splitlines()
    body = [line for line in out if not line.startswith("#")]
    assert body[0] == "@EXPLICIT"
    urls = dict(line.split("#") for line in body[1:])
    tool_file = channel / "linux-64" / "tool-2.0-0.conda"
    assert urls[tool_file.as_uri()] == hashlib.md5(tool_file.read_bytes()).hexdigest()
    assert len(urls) == 3
    assert any(line.startswith("#   six==") for line in out)
    pip = ok(envcrate("info", "--pins-only", "pip", conda_crate.archive)).stdout.split()
    assert len(pip) == 1 and pip[0].startswith("six==")


def test_archived_files_are_the_package_cache_bytes(conda_crate, conda_env, tmp_path):
    """Managed files go in with their placeholders: extracting with stock tar
    shows the package's bytes, not the env's."""
    check(["tar", "-I", "zstd", "-xf", conda_crate.archive, "-C", tmp_path])
    assert (tmp_path / "etc" / "tool.conf").read_text().startswith(f"prefix={PLACEHOLDER}\n")
    assert (conda_env / "etc" / "tool.conf").read_text().startswith(f"prefix={conda_env}\n")
    record = json.loads((tmp_path / "conda-meta" / "tool-2.0-0.json").read_text())
    assert record["link"]["source"] == "" and record["extracted_package_dir"] == ""
    assert (tmp_path / "lib" / "libgreeting.txt").is_symlink()


def test_crate_id_does_not_depend_on_where_the_env_was_built(channel, pkgs_dir, tmp_path):
    a = _fresh_env(channel, pkgs_dir, tmp_path / "a")
    b = _fresh_env(channel, pkgs_dir, tmp_path / "somewhere" / "much" / "longer" / "b")
    ca = pack(a, tmp_path / "ca.tar.zst")
    cb = pack(b, tmp_path / "cb.tar.zst")
    assert ca.id == cb.id
    again = pack(a, tmp_path / "again.tar.zst")
    assert again.archive.read_bytes() == ca.archive.read_bytes()
    gz = pack(a, tmp_path / "ca.tar.gz")
    assert gz.id == ca.id and gz.blob != ca.blob


def test_ensure_elsewhere_and_run_with_a_minimal_environment(conda_crate, conda_env, tmp_path):
    shutil.move(conda_env, tmp_path / "moved-away")  # nothing may lean on the original
    try:
        out = ok(envcrate("ensure", conda_crate.archive, "--cache", tmp_path / "c"))
        prefix = Path(out.stdout.strip())
        assert prefix.parent.parent == tmp_path / "c"
        # Before anything runs in it (root may write pycs into read-only trees).
        ok(envcrate("verify", conda_crate.archive, "--cache", tmp_path / "c"))  # by its archive
        minimal = {"PATH": "/usr/bin:/bin"}
        run = check(
            [
                prefix / "bin" / "python",
                "-c",
                "import sys, purepy, six; print(sys.prefix, purepy.X, six.__name__)",
            ],
            env=minimal,
        )
        assert run.stdout.split() == [str(prefix), "42", "six"]
        assert check([prefix / "bin" / "tool-script"], env=minimal).stdout.strip() == str(prefix)
        assert (
            check(
                [prefix / "bin" / "purepy-run"],
                env=dict(minimal, PATH=f"{prefix}/bin:/usr/bin:/bin"),
            ).stdout.strip()
            == "42"
        )
        assert (prefix / "etc" / "tool.conf").read_text().startswith(f"prefix={prefix}\n")
        if _has_elf(prefix):
            where = check([prefix / "bin" / "where"], env=minimal).stdout.strip()
            assert where == f"{prefix}/share/greeting.txt"
            data = (prefix / "bin" / "where").read_bytes()
            assert PLACEHOLDER.encode() not in data
        ldd = run_ldd(prefix / "bin" / "python")
        if ldd is not None:
            assert str(prefix) in ldd  # its own libpython, not the build machine's
        # conda-meta records name the placeholder as data (paths_data)
        named = text_files_naming(prefix, PLACEHOLDER)
        assert [p for p in named if not p.startswith("conda-meta/")] == []
        assert text_files_naming(prefix, str(conda_env)) == []
    finally:
        shutil.move(tmp_path / "moved-away", conda_env)


def run_ldd(exe: Path) -> str | None:
    if not shutil.which("ldd"):
        return None
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True)
    return next((line for line in out.stdout.splitlines() if "libpython" in line), None)


def test_run_and_activate_apply_state_vars_and_activate_d(conda_crate, tmp_path):
    cache = tmp_path / "c"
    code = "import os; print(os.environ['CONDA_PREFIX'], os.environ['TOOL_MODE'], os.environ['TOOL_HOME'])"
    out = ok(envcrate("run", conda_crate.archive, "--cache", cache, "--", "python", "-c", code))
    prefix, mode, home = out.stdout.split()
    assert mode == "fast" and home == f"{prefix}/share"
    status = envcrate("run", conda_crate.archive, "--cache", cache, "--", "sh", "-c", "exit 7")
    assert status.returncode == 7
    script = (
        f'out=$({_cli()} activate {conda_crate.archive} --cache {cache} --shell sh) && eval "$out" && '
        'echo "$CONDA_PREFIX $TOOL_MODE $TOOL_HOME" && command -v python'
    )
    shown = check(["sh", "-c", script]).stdout.split()
    assert shown == [prefix, "fast", f"{prefix}/share", f"{prefix}/bin/python"]
    # deactivate runs the deactivate.d scripts (the env still active), then
    # gives back what was there before
    script += ' && deactivate && echo "${CONDA_PREFIX-none} ${TOOL_MODE-none} ${TOOL_HOME-none}"'
    shown = check(["env", "-u", "CONDA_PREFIX", "TOOL_MODE=slow", "sh", "-c", script]).stdout
    assert shown.splitlines()[-2:] == [f"left {prefix}", "none slow none"]


def _cli() -> str:
    import sys

    return f"{sys.executable} -m envcrate.cli"


def test_a_prefix_longer_than_the_binary_placeholder_is_refused(conda_crate, conda_env, tmp_path):
    if not _has_elf(conda_env):
        pytest.skip("no C compiler: no binary placeholder to test")
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    out = envcrate("unpack", conda_crate.archive, deep)
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "\n" not in line and "bin/where" in line and f"at most {len(PLACEHOLDER)} bytes" in line
    assert not deep.exists()
    leftovers = list(deep.parent.iterdir()) if deep.parent.exists() else []
    assert leftovers == []


def test_deleted_or_overwritten_managed_files_are_refused_then_allowed(channel, pkgs_dir, tmp_path):
    env = _fresh_env(channel, pkgs_dir, tmp_path / "env")
    (env / "share" / "greeting.txt").unlink()
    conf = env / "lib" / "libgreeting.txt"
    conf.unlink()
    target = env / site_packages() / "purepy" / "__init__.py"
    target.unlink()  # a new file, not an edit of the package cache's hardlink
    target.write_text("X = 'clobbered by pip'\n")
    out = envcrate("pack", env, "-o", tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "\n" not in line and "--allow-missing-files" in line
    assert "tool 2.0: deleted" in line and "share/greeting.txt" in line
    assert "purepy 0.3: overwritten" in line
    assert not list(tmp_path.glob("*.tar.zst"))
    crate = pack(env, tmp_path, allow=["missing-files"])
    assert crate.manifest.data["flags"]["missing_files"]
    dest = tmp_path / "out"
    ok(envcrate("unpack", crate.archive, dest))
    assert not (dest / "share" / "greeting.txt").exists()
    assert "clobbered" in (dest / site_packages() / "purepy" / "__init__.py").read_text()


def test_missing_package_cache_is_refused_then_packed_as_is(channel, tmp_path):
    own_cache = tmp_path / "pkgs"
    env = install(channel, tmp_path / "env", SPECS, own_cache)
    shutil.rmtree(own_cache / "tool-2.0-0")
    out = envcrate("pack", env, "-o", tmp_path, env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "\n" not in line and "tool 2.0" in line and "--allow-missing-cache" in line
    crate = pack(env, tmp_path, allow=["missing-cache"])
    files = {r["path"]: r for r in crate.manifest.prefix_files}
    # The env's bytes, with the env's prefix in them, relocated from there.
    assert files["etc/tool.conf"]["placeholder"] == str(env)
    dest = tmp_path / "x"
    ok(envcrate("unpack", crate.archive, dest))
    assert (dest / "etc" / "tool.conf").read_text().startswith(f"prefix={dest}\n")
    if _has_elf(env):
        assert files["bin/where"]["mode"] == "binary"
        assert check([dest / "bin" / "where"]).stdout.strip() == f"{dest}/share/greeting.txt"


def test_records_without_link_information_as_pixi_writes_them(channel, pkgs_dir, tmp_path):
    env = _fresh_env(channel, pkgs_dir, tmp_path / "env")
    for rec in (env / "conda-meta").glob("*.json"):
        info = json.loads(rec.read_text())
        info.pop("link", None)
        info.pop("extracted_package_dir", None)
        rec.write_text(json.dumps(info))
    out = envcrate("pack", env, "-o", tmp_path, env=dict(os.environ, CONDA_PKGS_DIRS=str(pkgs_dir)))
    assert out.returncode == 0, out.stderr
    crate = next(tmp_path.glob("env-*.tar.zst"))
    shown = check(["tar", "-I", "zstd", "-xOf", crate, "etc/tool.conf"]).stdout
    assert shown.startswith(f"prefix={PLACEHOLDER}")


def test_pack_by_name_and_as_the_active_env(channel, pkgs_dir, tmp_path):
    home = tmp_path / "home"
    envs = tmp_path / "my envs"
    home.mkdir()
    (home / ".condarc").write_text(f"channels:\n  - defaults\nenvs_dirs:\n  - {envs}  # ours\n")
    env = _fresh_env(channel, pkgs_dir, envs / "analysis")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CONDA", "VIRTUAL_ENV"))}
    by_name = envcrate(
        "pack", "--name", "analysis", "-o", tmp_path, "--json", env=dict(clean, HOME=str(home))
    )
    assert by_name.returncode == 0, by_name.stderr
    crate_id = json.loads(by_name.stdout)["id"]
    active = envcrate(
        "pack", "-o", tmp_path / "a.tar.zst", "--json", env=dict(clean, CONDA_PREFIX=str(env))
    )
    assert json.loads(active.stdout)["id"] == crate_id
    missing = envcrate("pack", "--name", "nope", "-o", tmp_path, env=dict(clean, HOME=str(home)))
    assert missing.returncode == 1 and "no conda env named 'nope'" in missing.stderr
    (home / ".condarc").unlink()
    (home / ".conda").mkdir()
    (home / ".conda" / "environments.txt").write_text(f"{env}\n")
    registered = envcrate(
        "pack",
        "--name",
        "analysis",
        "-o",
        tmp_path / "r.tar.zst",
        "--json",
        env=dict(clean, HOME=str(home)),
    )
    assert json.loads(registered.stdout)["id"] == crate_id


def test_editable_install_in_a_conda_env_is_refused(channel, pkgs_dir, tmp_path):
    env = _fresh_env(channel, pkgs_dir, tmp_path / "env")
    (env / site_packages() / "__editable__.mine-0.1.pth").write_text(
        "import __editable___mine_finder\n"
    )
    out = envcrate("pack", env, "-o", tmp_path)
    assert out.returncode == 1 and "mine" in out.stderr and "--allow-editable" in out.stderr
    assert pack(env, tmp_path, allow=["editable"]).manifest.data["flags"]["editable"]


def test_conda_crates_ship_and_ensure_from_a_store(conda_crate, conda_env, tmp_path):
    from envcrate.envs import load_env
    from envcrate.packing import identify

    assert identify(load_env(conda_env)) == conda_crate.id  # what ship asks the store with
    store = tmp_path / "store"
    ok(envcrate("push", conda_crate.archive, "--store", store))
    shipped = ok(envcrate("ship", conda_env, "--store", store, "--json"))
    assert json.loads(shipped.stdout)["uploaded"] is False
    prefix = ok(
        envcrate("ensure", short_id(conda_crate.id), "--store", store, "--cache", tmp_path / "c")
    ).stdout.strip()
    assert check([Path(prefix) / "bin" / "python", "-c", "import purepy"]).returncode == 0


def test_a_bootstrap_script_activates_a_conda_crate_under_python_3_6(conda_crate, tmp_path):
    """No envcrate, Python 3.6 without zstandard (a conda crate brings its own
    interpreter): the cold fill, then sourcing the script applies the state
    variables and activate.d scripts, and deactivate runs deactivate.d."""
    py36 = shutil.which("python3.6", path=str(Path.home() / ".pyenv/versions/3.6.15/bin"))
    if py36 is None:
        pytest.skip("no Python 3.6 from pyenv")
    from envcrate.stores import open_store

    c = conda_crate
    store = tmp_path / "store"
    open_store(str(store)).publish(c.archive, c.manifest.data, "tar.zst", c.blob, c.size)
    boot = tmp_path / "boot.sh"
    made = envcrate("bootstrap", c.id, "--store", store, "--cache", tmp_path / "c", "-o", boot)
    assert made.returncode == 0, made.stderr
    node = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ENVCRATE_BOOT_PYTHON": py36}
    code = (
        f". {boot} || exit 9; "
        'echo "$CONDA_PREFIX $TOOL_MODE $TOOL_HOME"; command -v python; '
        'deactivate; echo "${CONDA_PREFIX-none} ${TOOL_MODE-none} ${TOOL_HOME-none}"'
    )
    for _ in ("cold", "warm"):
        shown = check(["sh", "-c", code], env=dict(node, TOOL_MODE="slow")).stdout.splitlines()
        prefix = shown[0].split()[0]
        assert shown[0].split() == [prefix, "fast", f"{prefix}/share"], shown
        assert shown[1] == f"{prefix}/bin/python"
        assert shown[-2:] == [f"left {prefix}", "none slow none"], shown


def test_a_conda_recipe_built_twice_in_two_places_is_one_crate(channel, tmp_path):
    """Locked by py-rattler (an @EXPLICIT list with sha256) and uv (the pip
    layer), installed from the lock into a temporary prefix, packed and
    shipped; twice, in two build directories: one crate (the pip layer's
    scripts and pycs do not keep the build path either)."""
    recipe = tmp_path / "conda.toml"
    recipe.write_text(
        'name = "tools"\nkind = "conda"\npython = "%d.%d.*"\n' % sys.version_info[:2]
        + f'specs = ["tool"]\nchannels = ["{channel.as_uri()}"]\n'
        + f'pip = ["six", "pyflakes"]\nfind-links = ["{WHEELHOUSE}"]\nno-index = true\n'
    )
    assert envcrate("lock", recipe).returncode == 0
    lock = (tmp_path / "conda.lock").read_text()
    assert "@EXPLICIT" in lock and "/tool-2.0-0.conda#" in lock and "/python-" in lock
    assert "# pip: six==" in lock and "--hash=sha256:" in lock
    ids = []
    for where in ("one", "two"):
        tmp = tmp_path / f"tmp-{where}"
        tmp.mkdir()
        done = envcrate(
            "build", recipe, "--store", tmp_path / f"store-{where}", "--json",
            env=dict(os.environ, TMPDIR=str(tmp), RATTLER_CACHE_DIR=str(tmp_path / "rattler")),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["id"])
        assert [n for n in os.listdir(tmp) if n.startswith("envcrate-")] == []
    assert ids[0] == ids[1]
    assert (tmp_path / "rattler" / "tool-2.0-0").is_dir()  # its package cache, not the user's
    cache = tmp_path / "cache"
    ran = envcrate("run", "--recipe", recipe, "--store", tmp_path / "store-one", "--cache", cache,
                   "--", "tool-script")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().startswith(str(cache))
    flakes = envcrate("run", "--recipe", recipe, "--store", tmp_path / "store-one", "--cache",
                      cache, "--", "pyflakes", "--version")  # fmt: skip
    assert flakes.returncode == 0, flakes.stderr
