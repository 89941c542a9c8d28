"""The example recipes in recipes/: each is a valid recipe; the scientific
stack locks and builds offline from the test wheelhouse (uv reads
UV_FIND_LINKS and UV_NO_INDEX) into a crate whose Python imports it all."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import WHEELHOUSE, envcrate, ok

from envcrate.build.recipe import load

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    "name, kind", [("scientific", "venv"), ("rp-worker", "venv"), ("conda-pip", "conda")]
)
def test_the_example_recipes_are_valid(name, kind):
    recipe = load(RECIPES / f"{name}.toml")
    assert recipe.kind == kind and recipe.pip_requirements


def test_the_scientific_recipe_locks_and_builds_offline(tmp_path):
    work = tmp_path / "recipes"
    work.mkdir()
    recipe = work / "scientific.toml"
    text = (RECIPES / "scientific.toml").read_text()
    # this machine's Python (the recipe names 3.11; the build key holds it)
    recipe.write_text(text.replace('python = "3.11"', 'python = "%d.%d"' % sys.version_info[:2]))
    offline = dict(os.environ, UV_FIND_LINKS=str(WHEELHOUSE), UV_NO_INDEX="1", UV_OFFLINE="1")
    locked = envcrate("lock", recipe, env=offline)
    assert locked.returncode == 0, locked.stderr
    pins = (work / "scientific.lock").read_text()
    for pkg in ("numpy==", "scipy==", "pandas==", "matplotlib==", "scikit-learn==", "requests=="):
        assert pkg in pins
    built = ok(envcrate("build", recipe, "--store", tmp_path / "store", "--json", env=offline))
    ran = envcrate(
        "run", built["id"], "--store", tmp_path / "store", "--cache", tmp_path / "cache", "--",
        "python", "-c",
        "import json, numpy, scipy, pandas, matplotlib, sklearn, requests;"
        "print(json.dumps([numpy.__version__, sklearn.__version__]))",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)[0] in pins


def test_the_rp_worker_recipe_builds_offline_with_the_application_s_wheel(tmp_path):
    """radical.pilot (some of it sdists, built by uv with setuptools from the
    same wheels directory) and the application's own package, md-sim, a
    wheel in the recipe's ./wheels."""
    from test_build import make_wheel

    work = tmp_path / "recipes"
    wheels = work / "wheels"
    wheels.mkdir(parents=True)
    for f in WHEELHOUSE.iterdir():
        (wheels / f.name).symlink_to(f)
    make_wheel(wheels, "md_sim", "1.0")
    recipe = work / "rp-worker.toml"
    text = (RECIPES / "rp-worker.toml").read_text()
    recipe.write_text(text.replace('python = "3.11"', 'python = "%d.%d"' % sys.version_info[:2]))
    offline = dict(os.environ, UV_NO_INDEX="1", UV_OFFLINE="1")
    locked = envcrate("lock", recipe, env=offline)
    assert locked.returncode == 0, locked.stderr
    assert "radical-pilot==1.103" in (work / "rp-worker.lock").read_text()
    built = ok(envcrate("build", recipe, "--store", tmp_path / "store", "--json", env=offline))
    ran = envcrate(
        "run", built["id"], "--store", tmp_path / "store", "--cache", tmp_path / "cache", "--",
        "python", "-c", "import radical.pilot as rp, md_sim; print(md_sim.VERSION, rp.version)",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[0] == "1.0" and ran.stdout.split()[1].startswith("1.103")
