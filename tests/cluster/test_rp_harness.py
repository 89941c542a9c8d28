"""Smoke tests of the RADICAL-Pilot harness (tests/cluster/radical.py).

One real RP session with a local pilot (local.localhost, offline) runs all
tasks of this module; each test checks one of them.  They also pin the RP
behaviours that envcrate's RP integration has to live with, so that an RP
upgrade that changes one shows up here.
"""

from __future__ import annotations

import pytest

from .radical import RP_VENV, run_rp_once, task

SHELL_ENV = [
    "export EC_PLAIN=plain",
    # A prepare_env "shell" pre_exec line is wrapped in double quotes and
    # shlex-split by RP: single quotes survive, double quotes do not.
    "export EC_QUOTED='two words'",
]

NO_ENVCRATE = """\
for py in python3 python; do
    command -v "$py" >/dev/null || continue
    if "$py" -c 'import envcrate' 2>/dev/null; then
        echo "envcrate importable with $(command -v "$py")"
        exit 1
    fi
    echo "$py: $(command -v "$py"): no envcrate"
done
"""

PROBE = """\
printf 'PATH=%s\\n' "$PATH"
printf 'VIRTUAL_ENV=%s\\n' "${VIRTUAL_ENV-<unset>}"
printf 'PYTHONPATH=%s\\n' "${PYTHONPATH-<unset>}"
printf 'HOME=%s\\n' "$HOME"
printf 'STAGED=%s\\n' "$(cat "$RP_RESOURCE_SANDBOX/harness/data.txt")"
"""


def _spec(d):
    data = d / "data.txt"
    data.write_text("staged once\n")
    return {
        "cores": 2,
        "timeout": 240,
        "named_envs": [{"name": "ec_shell", "type": "shell", "pre_exec": SHELL_ENV}],
        "pilot_input_staging": [
            {"source": str(data), "target": "resource:///harness/data.txt", "if_missing": True}
        ],
        "tasks": [
            {"name": "hi1", "executable": "/bin/echo", "arguments": ["hi"]},
            {"name": "hi2", "executable": "/bin/echo", "arguments": ["hi"]},
            {
                "name": "pre_fails",
                "executable": "/bin/echo",
                "arguments": ["ran"],
                "pre_exec": ["false"],
            },
            {
                "name": "eval_hides",
                "executable": "/bin/echo",
                "arguments": ["ran"],
                "pre_exec": ['eval "$(false)"'],
            },
            {
                "name": "eval_checked",
                "executable": "/bin/echo",
                "arguments": ["ran"],
                "pre_exec": ['out="$(false)" && eval "$out"'],
            },
            {"name": "no_envcrate", "script": NO_ENVCRATE},
            {
                "name": "named_shell",
                "script": 'printf "%s|%s\\n" "$EC_PLAIN" "$EC_QUOTED"\n',
                "named_env": "ec_shell",
            },
            {"name": "probe", "script": PROBE, "environment": {"EC_TASK_VAR": "x y"}},
        ],
    }


@pytest.fixture(scope="module")
def rp(tmp_path_factory):
    return run_rp_once("harness", _spec, tmp_path_factory)


def test_two_tasks_run(rp):
    for name in ("hi1", "hi2"):
        t = task(rp, name)
        assert (t["state"], t["exit_code"], t["stdout"]) == ("DONE", 0, "hi\n"), t
    assert rp["pilot"]["state"] == "PMGR_ACTIVE"


def test_failing_pre_exec_fails_the_task(rp):
    t = task(rp, "pre_fails")
    # RP runs each line as `LINE || rp_error pre_exec`: exit 1, no executable.
    assert (t["state"], t["exit_code"]) == ("FAILED", 1), t
    assert "pre_exec failed" in t["stderr"]
    assert "ran" not in (t["stdout"] or "")


def test_eval_of_a_failing_command_is_hidden(rp):
    # `eval "$(cmd)"` returns eval's status (0 for empty input), not cmd's.
    t = task(rp, "eval_hides")
    assert (t["state"], t["exit_code"], t["stdout"]) == ("DONE", 0, "ran\n"), t
    t = task(rp, "eval_checked")
    assert (t["state"], t["exit_code"]) == ("FAILED", 1), t


def test_envcrate_not_importable_in_tasks(rp):
    t = task(rp, "no_envcrate")
    assert (t["state"], t["exit_code"]) == ("DONE", 0), t
    assert "no envcrate" in t["stdout"], t


def test_named_env_of_type_shell(rp):
    assert rp["named_envs"]["ec_shell"]["ok"], rp["named_envs"]
    t = task(rp, "named_shell")
    assert (t["state"], t["exit_code"]) == ("DONE", 0), t
    assert t["stdout"] == "plain|two words\n"


def test_task_environment_and_staging(rp):
    t = task(rp, "probe")
    assert (t["state"], t["exit_code"]) == ("DONE", 0), t
    lines = dict(line.split("=", 1) for line in t["stdout"].splitlines())
    # The pilot starts as `bash -l`: PATH is the login shell's, RP's venv
    # bin is not on it (but its VIRTUAL_ENV and a PYTHONPATH leak in).
    assert f"{RP_VENV}/bin" not in lines["PATH"].split(":")
    assert lines["VIRTUAL_ENV"] == str(RP_VENV)
    assert lines["STAGED"] == "staged once"
    assert rp["pilot"]["staged"] or rp["pilot"]["staging_skipped"]
    assert lines["HOME"].endswith("/home")
