"""envcrate.integrations.radical on a real RADICAL-Pilot (a local pilot,
offline, in .rp-venv, which has no envcrate): the bootstrap script and the
crate's archives staged once into the pilot's resource sandbox, tasks
activated by pre_exec or through a named env, a broken crate failing its
task with envcrate's line, and the client reading the report."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import envcrate

import envcrate.integrations.radical as ecr
from envcrate.stores import open_store

from .radical import run_rp_once, task

CODE = "import os, sys, six; print(sys.prefix); print(os.environ.get('PYTHONPATH', '-'))"


def _spec(small_crate):
    def make(d: Path) -> dict:
        c = small_crate
        store = d / "store"
        open_store(str(store)).publish(c.archive, c.manifest.data, "tar.zst", c.blob, c.size)
        staged = d / "staged"
        staged.mkdir()
        boot = staged / f"envcrate-boot-{c.id[7:19]}.sh"
        made = envcrate(
            "bootstrap", c.id, "--store", store, "--stage", "-o", boot,
            "--cache", "$RP_RESOURCE_SANDBOX/envcrate/cache", "--report", d / "report",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        archives = sorted(str(p) for p in staged.iterdir() if p != boot)
        # A second script whose crate's archive is nowhere the node can find.
        broken = staged / "envcrate-boot-broken.sh"
        shutil.copy(boot, broken)
        text = broken.read_text()
        config = text.split('_CONFIG = json.loads(binascii.a2b_base64("', 1)[1].split('"', 1)[0]
        import base64

        cfg = json.loads(base64.b64decode(config))
        fake = "sha256:" + "0" * 64  # a crate that is in no cache
        cfg["id"] = fake
        for a in cfg["archives"]:
            a["staged"], a["paths"] = "not-staged.tar.zst", ["/nonexistent/archive"]
        new = base64.b64encode(json.dumps(cfg, sort_keys=True).encode()).decode()
        broken.write_text(
            text.replace(config, new).replace(c.id, fake).replace(c.id[7:23], fake[7:23])
        )
        shutil.rmtree(store)  # the node cannot reach the store: staged archives only
        return {
            "cores": 2,
            "timeout": 300,
            "stage_once": {
                "module": ecr.__file__,
                "script": str(boot),
                "archives": archives,
                "times": 2,
            },
            "pilot_input_staging": ecr.staging(broken),
            "named_envs": [{"name": "crate", **ecr.named_env(boot)}],
            "tasks": [
                {
                    "name": "pre_exec",
                    "script": f'python -c "{CODE}"\n',
                    "pre_exec": ecr.pre_exec(boot),
                },
                {"name": "named", "script": f'python -c "{CODE}"\n', "named_env": "crate"},
                {
                    "name": "no_envcrate",
                    "script": "python -c 'import envcrate'\n",
                    "pre_exec": ecr.pre_exec(boot),
                },
                {
                    "name": "broken",
                    "executable": "/bin/echo",
                    "arguments": ["ran"],
                    "pre_exec": ecr.pre_exec(broken),
                },
            ],  # fmt: skip
        }

    return make


@pytest.fixture(scope="module")
def rp(small_crate, tmp_path_factory):
    return run_rp_once("envcrate-radical", _spec(small_crate), tmp_path_factory)


def _sandbox_cache(rp) -> Path:
    return Path(rp["session"]["resource_sandbox"]) / "envcrate" / "cache" / "e"


def test_staged_once_then_reused(rp):  # the script and the tar.zst archive
    first, second = rp["pilot"]["stage_once"]
    assert len(first) == 2 and all(t.startswith("resource:///envcrate/") for t in first)
    assert second == []  # already there: not copied again


def test_a_task_activated_by_pre_exec(rp):
    t = task(rp, "pre_exec")
    assert t["state"] == "DONE" and t["exit_code"] == 0, t
    prefix, pythonpath = t["stdout"].split()
    assert Path(prefix).parent == _sandbox_cache(rp)
    assert pythonpath == "-"  # the pilot's leaked PYTHONPATH is gone


def test_a_task_in_a_named_env(rp):
    t = task(rp, "named")
    assert t["state"] == "DONE" and t["exit_code"] == 0, t
    assert Path(t["stdout"].split()[0]).parent == _sandbox_cache(rp)


def test_the_task_env_has_no_envcrate(rp):
    t = task(rp, "no_envcrate")
    assert t["state"] == "FAILED" and "No module named 'envcrate'" in t["stderr"], t


def test_a_broken_crate_fails_its_task_with_envcrate_s_line(rp):
    t = task(rp, "broken")
    assert t["state"] == "FAILED" and "ran" not in t["stdout"], t
    assert "envcrate: error: no archive of" in t["stderr"], t["stderr"]


def test_the_client_sees_every_task_in_the_report(rp):
    # the spec's directory: the sandbox is <it>/rp, the resource sandbox in that
    report = Path(rp["session"]["resource_sandbox"]).parents[1] / "report"
    shown = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", "report", str(report), "--json"],
        capture_output=True,
        text=True,
    )
    totals = json.loads(shown.stdout)["totals"]
    assert shown.returncode == 1  # one FAILED
    assert totals["FAILED"] == 1 and totals["READY"] == 1, totals
    assert totals["HIT"] + totals["WAITED"] >= 2, totals
