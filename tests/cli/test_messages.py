"""The command line as a new user meets it: mistakes get one line that says
what is wrong and what to do, and every command's help is true to it."""

from __future__ import annotations

import os
import re

import pytest
from conftest import envcrate, fails, ok

HEADER = ["ID", "TAGS", "NAME", "KIND", "PYTHON", "SIZE", "CREATED"]


@pytest.mark.parametrize("ref", ["missing/env.tar.zst", "env.tar.zst", "./env.tar.gz"])
def test_an_archive_path_that_does_not_exist_is_no_such_archive(ref, shipped, tmp_path, env):
    cache = tmp_path / "cache"
    for args in (["info", ref], ["ensure", ref, "--cache", cache], ["run", ref, "--", "true"]):
        err = fails(envcrate(*args, "--store", shipped, env=env), "no such archive", ref)
        assert "cannot be a tag" not in err
    err = fails(envcrate("ensure", ref, "--cache", cache, env=env), "no such archive", ref)
    assert not cache.exists() or not os.listdir(cache / "e")


def test_ls_of_a_store_that_is_not_there_says_so(shipped, tmp_path, env):
    typo = tmp_path / "stroe"
    out = envcrate("ls", "--store", typo, env=env)
    fails(out, f"no store at {typo}", "--store")
    assert out.stdout == ""
    for args in (["info", "small"], ["tag", "small", "other"], ["rm", "small"]):
        fails(envcrate(*args, "--store", typo, env=env), f"no store at {typo}")
    assert not typo.exists()
    listed = envcrate("ls", env=env)  # the default store: nothing shipped yet, no error
    assert listed.returncode == 0 and listed.stdout.split() == HEADER


def test_the_ls_hint_keeps_the_store_given(shipped, env):
    err = fails(envcrate("info", "no-such-tag", "--store", shipped, env=env), "no crate or tag")
    assert f"`envcrate ls --store {shipped}`" in err
    err = fails(envcrate("info", "no-such-tag", env=env), "no crate or tag")
    assert "`envcrate ls` lists them" in err


def test_a_short_prefix_says_a_prefix_needs_12_digits(small_crate, shipped, tmp_path, env):
    short = small_crate.id.split(":")[1][:8]
    for args in (["info", short, "--store", shipped], ["ensure", short, "--store", shipped]):
        fails(envcrate(*args, "--cache", tmp_path / "c", env=env), "12 or more hex digits")
    ok(
        envcrate(
            "ensure",
            small_crate.id,
            "--store",
            shipped,
            "--cache",
            tmp_path / "c",
            "--json",
            env=env,
        )
    )
    fails(envcrate("rm", short, "--cache", tmp_path / "c", env=env), "12 or more hex digits")
    fails(envcrate("ensure", short, "--cache", tmp_path / "c", env=env), "12 or more hex digits")


def test_run_without_the_double_dash_says_where_the_command_goes(shipped, env):
    out = envcrate("run", "small", "python", "-V", "--store", shipped, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--" in out.stderr.splitlines()[-1] and "envcrate run REF -- " in out.stderr


def test_conda_pins_of_a_venv_crate_are_refused(small_crate, env):
    err = fails(envcrate("info", small_crate.archive, "--pins-only", "conda", env=env), "venv")
    assert "--pins-only pip" in err
    pins = envcrate("info", small_crate.archive, "--pins-only", "pip", env=env)
    assert pins.returncode == 0 and "six==" in pins.stdout


COMMANDS = ["pack", "unpack", "push", "ship", "ls", "info", "tag", "rm", "fsck", "url"]
COMMANDS += ["verify", "ensure", "activate", "run", "gc"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example_and_help_for_its_arguments(command, env):
    out = envcrate(command, "--help", env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "example" in text.lower() and f"envcrate {command} " in text.split("xample", 1)[1]
    lines = text.split("positional arguments:", 1)
    if len(lines) == 2:
        block = lines[1].split("\n\n", 1)[0].splitlines()
        # each positional names a help text on its line or the next
        names = [ln for ln in block if ln.startswith("  ") and not ln.startswith("     ")]
        for ln in names:
            assert len(ln.split()) > 1 or block[block.index(ln) + 1].startswith("     "), (
                command,
                ln,
            )


def test_help_names_only_what_the_command_takes(env):
    ship = envcrate("ship", "--help", env=env).stdout
    assert not re.search(r"(^|[\s\[(,'])-o\b", ship), ship
    url = envcrate("url", "--help", env=env).stdout
    assert "directory" not in url and "file://" not in url and "s3://" in url
