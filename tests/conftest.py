"""Shared fixtures: a tiny local model with its training objects, built fresh for each test."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings

from hf_rl_ckpt.cli import main as cli_main
from training_objects import make_training_objects


@pytest.fixture
def make_objects():
    return make_training_objects


@pytest.fixture
def cli(capsys):
    """`hf-rl-ckpt ARGS` run in this process: its exit code, stdout and stderr (a fresh interpreter per call costs
    seconds; the installed command's own exit codes are checked in a real process by tests/test_cli_full.py)."""

    def run(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        returncode = cli_main(list(args))
        output = capsys.readouterr()
        return SimpleNamespace(returncode=returncode, stdout=output.out, stderr=output.err)

    return run


@pytest.fixture(autouse=True)
def _library_logs_visible(caplog):
    caplog.set_level(logging.INFO, logger="hf_rl_ckpt")


# `--hypothesis-profile=soak`: the model-based test (tests/test_manager_model_based.py) explores many more and
# longer runs, with fresh random choices each time (benchmarks/model_based_soak.py). Registered here, before the
# hypothesis plugin loads the profile named on the command line.
settings.register_profile(
    "soak", max_examples=150, stateful_step_count=40, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1 for the whole session."""
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server reached the standard way (AWS_ENDPOINT_URL and keys in the environment, also for child processes) and a fresh bucket's URL."""
    import fsspec

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    fsspec.AbstractFileSystem.clear_instance_cache()  # filesystems built for another endpoint must not be reused
    return SimpleNamespace(server=s3_server, url=f"s3://{s3_server.bucket()}/run")
