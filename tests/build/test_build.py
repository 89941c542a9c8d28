"""Recipes, locks and builds (venvs): a recipe built twice in two build
directories gives one crate; a changed pin gives another, and ``diff``
names it; a store that has the build builds nothing; ``ensure --recipe``
finds it; bad recipes, locks and builds are one line each, nothing
published. Installs come from the test wheelhouse and wheels made here,
offline."""

import base64
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import WHEELHOUSE, envcrate, fails, ok


def make_wheel(directory: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of module ``name`` whose VERSION is ``version``."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rows = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    rows.append(f"{dist}/RECORD,,")
    whl = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{dist}/RECORD", "\n".join(rows) + "\n")
    return whl


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    for version in ("1.0", "2.0"):
        make_wheel(d, "pinned", version)
    return d


def write_recipe(path: Path, wheels: Path, requirements: list, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        'name = "tiny"',
        'kind = "venv"',
        'python = "%d.%d"' % sys.version_info[:2],
        f"requirements = {json.dumps(requirements)}",
        f"find-links = [{json.dumps(str(WHEELHOUSE))}, {json.dumps(str(wheels))}]",
        "no-index = true",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_env(tmp_path: Path, name: str) -> dict:
    """The environment of one build: a TMPDIR of its own (where the build
    directory goes), so two builds happen in two places."""
    tmp = tmp_path / f"tmp-{name}"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp), PIP_DISABLE_PIP_VERSION_CHECK="1")


def test_a_recipe_built_twice_in_two_places_is_one_crate(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "r" / "envcrate.toml", wheels, ["six", "pinned==1.0"])
    locked = envcrate("lock", recipe)
    assert locked.returncode == 0, locked.stderr
    lock = (tmp_path / "r" / "envcrate.lock").read_text()
    assert "pinned==1.0" in lock and "--hash=sha256:" in lock
    first = ok(envcrate("build", recipe, "--store", tmp_path / "s1", "--json",
                        env=build_env(tmp_path, "one")))  # fmt: skip
    second = ok(envcrate("build", recipe, "--store", tmp_path / "s2", "--json",
                         env=build_env(tmp_path, "two")))  # fmt: skip
    assert first["built"] and second["built"]
    assert first["id"] == second["id"] and first["key"] == second["key"]
    for name in ("one", "two"):  # the build directories are gone
        assert [n for n in os.listdir(tmp_path / f"tmp-{name}") if n.startswith("envcrate-")] == []


def test_a_changed_pin_is_another_crate_and_diff_names_it(wheels, tmp_path):
    store = tmp_path / "store"
    ids = []
    for version in ("1.0", "2.0"):
        recipe = write_recipe(tmp_path / version / "envcrate.toml", wheels, [f"pinned=={version}"])
        ids.append(ok(envcrate("build", recipe, "--store", store, "--json"))["id"])
    assert ids[0] != ids[1]
    d = ok(envcrate("diff", ids[0], ids[1], "--store", store, "--json"))
    assert d["pins"]["changed"] == [{"kind": "pypi", "name": "pinned", "from": "1.0", "to": "2.0"}]
    assert d["pins"]["added"] == d["pins"]["removed"] == []
    changed = set(d["files"]["changed"]) | set(d["files"]["added"]) | set(d["files"]["removed"])
    assert any(p.endswith("/pinned.py") for p in changed)
    assert any("pinned-2.0.dist-info" in p for p in d["files"]["added"])
    text = envcrate("diff", ids[0], ids[1], "--store", store)
    assert text.returncode == 0 and "~ pinned 1.0 -> 2.0" in text.stdout
    same = envcrate("diff", ids[0], ids[0], "--store", store)
    assert same.stdout.startswith("the same crate")


def test_a_store_that_has_the_build_builds_nothing(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "r" / "envcrate.toml", wheels, ["pinned==1.0"])
    store = tmp_path / "store"
    built = ok(envcrate("build", recipe, "--store", store, "--json"))
    env = build_env(tmp_path, "again")
    again = envcrate("build", recipe, "--store", store, "--json", "--tag", "tiny:1", env=env)
    got = ok(again)
    assert got == dict(built, built=False, seconds=got["seconds"], tag="tiny:1")
    assert os.listdir(tmp_path / "tmp-again") == []  # no build directory (nor uv) was made
    listed = ok(envcrate("ls", "--store", store, "--json"))
    assert [c["id"] for c in listed["crates"]] == [built["id"]]
    assert (
        json.loads((store / "builds" / f"{built['key'][7:]}.json").read_text())["crate"]
        == built["id"]
    )


def test_ensure_and_run_name_the_recipe(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "r" / "envcrate.toml", wheels, ["pinned==2.0"])
    store = tmp_path / "store"
    no_lock = envcrate("ensure", "--recipe", recipe, "--store", store, "--cache", tmp_path / "c")
    fails(no_lock, "has no lock", "envcrate lock")
    assert envcrate("lock", recipe).returncode == 0
    not_yet = envcrate("ensure", "--recipe", recipe, "--store", store, "--cache", tmp_path / "c")
    fails(not_yet, "is not built in", "envcrate build")
    built = ok(envcrate("build", recipe, "--store", store, "--json"))
    done = ok(envcrate("ensure", "--recipe", recipe, "--store", store, "--cache", tmp_path / "c",
                       "--json"))  # fmt: skip
    assert done["id"] == built["id"]
    ran = envcrate("run", "--recipe", recipe, "--store", store, "--cache", tmp_path / "c", "--",
                   "python", "-c", "import pinned; print(pinned.VERSION)")  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip() == "2.0", ran.stderr
    both = envcrate("ensure", built["id"], "--recipe", recipe, "--store", store)
    fails(both, "not both")


@pytest.mark.parametrize(
    "text, words",
    [
        ('name = "x"\nkind = "venv"\npython = "3.11\n', ["line 3", "not valid TOML"]),
        ('name = "x"\nkind = "venv"\npython = "3.11"\nrequirement = ["six"]\n',
         ["line 4", "requirement is not a recipe key"]),
        ('name = "x"\nkind = "venv"\npython = 3.11\n', ["line 3", "python must be a string"]),
        ('name = "x"\nkind = "venv"\n', ["has no python"]),
        ('name = "x"\nkind = "pixi"\npython = "3.11"\n', ["line 2", "kind"]),
        ('name = "x"\nkind = "venv"\npython = "3.11"\nspecs = ["numpy"]\n',
         ["line 4", "specs is not a key of a venv recipe"]),
        ('name = "x"\nkind = "venv"\npython = "3.11"\n[env]\nN = 1\n', ["line 4", "env values must be strings"]),
    ],
)  # fmt: skip
def test_a_bad_recipe_is_one_line_naming_line_and_key(text, words, tmp_path):
    recipe = tmp_path / "envcrate.toml"
    recipe.write_text(text)
    fails(envcrate("lock", recipe), str(recipe), *words)
    fails(envcrate("build", recipe, "--store", tmp_path / "s"), *words)
    assert not (tmp_path / "envcrate.lock").exists() and not (tmp_path / "s").exists()


def test_a_requirement_that_does_not_resolve_gives_the_resolver_s_reason(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "envcrate.toml", wheels, ["pinned==3.0"])
    err = fails(envcrate("lock", recipe), "tiny does not resolve", "pinned")
    assert "3.0" in err
    assert not (tmp_path / "envcrate.lock").exists()


def test_a_lock_that_no_longer_matches_its_recipe_says_to_relock(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "envcrate.toml", wheels, ["pinned==1.0"])
    assert envcrate("lock", recipe).returncode == 0
    write_recipe(recipe, wheels, ["pinned==2.0"])
    for cmd in (("build", recipe, "--store", tmp_path / "s"),
                ("ensure", "--recipe", recipe, "--store", tmp_path / "s")):  # fmt: skip
        fails(envcrate(*cmd), "no longer matches its recipe", "envcrate lock")
    assert not (tmp_path / "s").exists()


def test_a_failing_build_names_the_installer_s_error_and_leaves_nothing(wheels, tmp_path):
    recipe = write_recipe(tmp_path / "envcrate.toml", wheels, ["pinned==1.0"])
    assert envcrate("lock", recipe).returncode == 0
    lock = tmp_path / "envcrate.lock"
    text = lock.read_text()
    good = text.split("--hash=sha256:")[1][:64]
    lock.write_text(text.replace(good, "0" * 64))  # the wheel no longer matches its pin
    env = build_env(tmp_path, "failing")
    done = envcrate("build", recipe, "--store", tmp_path / "s", env=env)
    # progress lines, then the error: one line naming the step and uv's reason
    assert done.returncode == 1 and "Traceback" not in done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("envcrate: error: building tiny failed at uv pip sync: ")
    assert "hash mismatch" in err.lower(), err
    left = [n for n in os.listdir(tmp_path / "tmp-failing") if n.startswith("envcrate-")]
    assert left == []  # the temporary prefix is removed
    assert not (tmp_path / "s" / "crates").exists() and not (tmp_path / "s" / "builds").exists()


def test_lock_output_and_the_default_recipe(wheels, tmp_path):
    write_recipe(tmp_path / "envcrate.toml", wheels, ["pinned==1.0"])
    out = tmp_path / "elsewhere.lock"
    done = envcrate("lock", "-o", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pinned==1.0" in out.read_text() and not (tmp_path / "envcrate.lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(envcrate("lock", cwd=empty), "no recipe at")


def test_a_lock_holds_when_the_recipe_moves_to_another_checkout(wheels, tmp_path):
    """The recipe's digest covers find-links as written (relative), not
    where this checkout happens to be."""
    first = tmp_path / "checkout-1"
    (first / "wheels").mkdir(parents=True)
    for f in wheels.iterdir():
        (first / "wheels" / f.name).write_bytes(f.read_bytes())
    (first / "envcrate.toml").write_text(
        'name = "tiny"\nkind = "venv"\npython = "%d.%d"\n' % sys.version_info[:2]
        + 'requirements = ["pinned==1.0"]\nfind-links = ["wheels"]\nno-index = true\n'
    )
    assert envcrate("lock", first / "envcrate.toml").returncode == 0
    second = tmp_path / "elsewhere" / "checkout-2"
    second.parent.mkdir()
    first.rename(second)
    built = ok(envcrate("build", second / "envcrate.toml", "--store", tmp_path / "s", "--json"))
    assert built["built"]


def test_a_pin_with_a_url_fragment_is_a_pin(tmp_path):
    """uv writes direct references as `name @ URL#sha256=...`: the lock
    reader took them for conda lines and asked to re-lock, forever."""
    wheel = next(WHEELHOUSE.glob("six-*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    recipe = tmp_path / "envcrate.toml"
    recipe.write_text(
        'name = "direct"\nkind = "venv"\npython = "%d.%d"\n' % sys.version_info[:2]
        + f'requirements = ["six @ {wheel.as_uri()}#sha256={sha}"]\nno-index = true\n'
    )
    assert envcrate("lock", recipe).returncode == 0
    assert f"#sha256={sha}" in (tmp_path / "envcrate.lock").read_text()
    ok(envcrate("build", recipe, "--store", tmp_path / "s", "--json"))


@pytest.mark.parametrize(
    "env_table, words",
    [('"A=B" = "1"', "names must be non-empty, without '='"), ('"" = "1"', "names must be")],
)
def test_bad_build_variables_are_one_line(env_table, words, tmp_path):
    recipe = tmp_path / "envcrate.toml"
    recipe.write_text(f'name = "x"\nkind = "venv"\npython = "3.11"\n[env]\n{env_table}\n')
    fails(envcrate("lock", recipe), "line 4", words)


def test_a_lock_with_a_bad_conda_line_says_to_relock(tmp_path):
    recipe = tmp_path / "c.toml"
    recipe.write_text(
        'name = "c"\nkind = "conda"\npython = "3.11.*"\nspecs = ["x"]\nchannels = ["x"]\n'
    )
    from envcrate.build.recipe import load

    digest = load(recipe).digest()
    (tmp_path / "c.lock").write_text(
        f"# envcrate-recipe: {digest}\n# envcrate-kind: conda\n@EXPLICIT\n"
        f"https://example.invalid/linux-64/noversion.conda#{'0' * 64}\n"
    )
    fails(
        envcrate("build", recipe, "--store", tmp_path / "s"), "not a conda package URL", "re-lock"
    )
