"""Shared fixtures: a tiny local model with its training objects, built fresh for each test."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, settings

from training_objects import make_training_objects


@pytest.fixture
def make_objects():
    return make_training_objects


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
