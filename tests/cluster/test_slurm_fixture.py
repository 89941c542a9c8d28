"""The test Slurm cluster itself: a two-node job runs a step on each node, each
node has its own local directory, and a failing step fails the job."""

import subprocess

from .slurm import slurm  # noqa: F401  (the session fixture)


def script(path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    return path


def test_two_node_job_runs_a_step_on_each_node(slurm, tmp_path):  # noqa: F811
    job = slurm.sbatch(
        script(
            tmp_path / "two.sh",
            "#SBATCH -N 2\n"
            "set -e\n"
            "echo batch on $SLURMD_NODENAME\n"
            "srun --ntasks-per-node=1 sh -c"
            " 'echo step on $SLURMD_NODENAME in $NODE_LOCAL_DIR;"
            ' test "$NODE_LOCAL_DIR" = "$NODE_LOCAL_BASE/$SLURMD_NODENAME";'
            " echo $SLURM_JOB_ID > $NODE_LOCAL_DIR/ran'\n",
        ),
        timeout=60,
    )
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.output
    lines = job.output.splitlines()
    assert "batch on n1" in lines, job.output
    steps = sorted(line for line in lines if line.startswith("step on "))
    assert steps == [
        f"step on n1 in {slurm.node_local('n1')}",
        f"step on n2 in {slurm.node_local('n2')}",
    ], job.output
    for node in ("n1", "n2"):
        assert (slurm.node_local(node) / "ran").read_text().strip() == str(job.job_id)
    # The clients work against it with env(): the job is finished, so no longer queued.
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=slurm.env(), capture_output=True, text=True, check=True
    )
    assert str(job.job_id) not in out.stdout.split()


def test_a_failing_step_fails_the_job(slurm, tmp_path):  # noqa: F811
    job = slurm.sbatch(
        script(
            tmp_path / "fail.sh",
            "#SBATCH -N 2\nset -e\nsrun --ntasks-per-node=1 sh -c 'exit 3'\necho not reached\n",
        ),
        timeout=60,
    )
    assert job.state == "FAILED", job
    assert job.exit_code != 0, job
    assert "not reached" not in job.output
    assert "Exited with exit code 3" in job.output, job.output
