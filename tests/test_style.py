"""The code stays ruff-clean (configuration in pyproject.toml)."""

import shutil

import pytest
from conftest import ROOT, run


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by the test extras")
def test_ruff_check_and_format():
    out = run(["ruff", "check", "src", "tests", "bench"], cwd=ROOT)
    assert out.returncode == 0, out.stdout
    out = run(["ruff", "format", "--check", "src", "tests", "bench"], cwd=ROOT)
    assert out.returncode == 0, out.stdout
