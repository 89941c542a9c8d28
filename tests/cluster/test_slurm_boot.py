"""The README's Slurm pattern on a real two-node Slurm: a bootstrap script
fills each node's local cache once from a shared directory store, then the
job's steps run in the env; nodes have no envcrate, and the client reads
what happened on each in ``envcrate report``."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import envcrate, publish

from .slurm import slurm  # noqa: F401  (the session fixture)

JOB = """#!/bin/sh
#SBATCH -N 2 --ntasks-per-node=2
set -e
# once per node, into node-local storage (the script's --cache)
srun -n "$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 sh {boot} prefix
# then the job's steps run in the env
srun --ntasks-per-node=2 sh {boot} run -- python -c '{code}'
"""

CODE = (
    "import os, sys, six;"
    "import importlib.util as u;"
    'print("step", os.environ["SLURMD_NODENAME"], sys.prefix, u.find_spec("envcrate") is None)'
)


def test_a_job_bootstraps_each_node_once_and_runs_its_steps_in_the_env(
    slurm,  # noqa: F811
    small_crate,
    tmp_path,
):
    store = publish(small_crate, tmp_path / "store", tag="small")
    boot, report = tmp_path / "boot.sh", tmp_path / "report"
    made = envcrate(
        "bootstrap", "small", "--store", store, "--cache", "$NODE_LOCAL_DIR/envcrate",
        "--report", report, "-o", boot,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    job_file = tmp_path / "job.sh"
    job_file.write_text(JOB.format(boot=boot, code=CODE))
    # The nodes' environment: the system's tools and Python, no envcrate, no PYTHONPATH.
    node_env = {k: v for k, v in slurm.env().items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    node_env["PATH"] = "/usr/sbin:/usr/bin:/bin"
    check = subprocess.run(["python3", "-c", "import envcrate"], env=node_env, capture_output=True)
    assert check.returncode != 0  # the node's python3 has no envcrate
    job = slurm.sbatch(job_file, timeout=120, env=node_env)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.output

    steps = sorted(line.split() for line in job.output.splitlines() if line.startswith("step "))
    assert len(steps) == 4, job.output
    for _, node, prefix, no_envcrate in steps:
        assert Path(prefix).parent == slurm.node_local(node) / "envcrate" / "e", prefix
        assert no_envcrate == "True"
    assert {s[1] for s in steps} == {"n1", "n2"}
    for node in ("n1", "n2"):  # one entry per node-local cache
        entries = os.listdir(slurm.node_local(node) / "envcrate" / "e")
        assert [e for e in entries if not e.startswith(".")] and len(entries) == 1, entries

    shown = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", "report", str(report), "--json"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    totals = json.loads(shown.stdout)["totals"]
    assert totals["READY"] == 2 and totals["FAILED"] == 0, totals  # one fill per node
    assert totals["HIT"] == 4, totals  # every step's script: a warm hit in plain sh
