"""Shared fixtures: a tiny local model with its training objects, built fresh for each test."""

from __future__ import annotations

import logging

import pytest

from training_objects import make_training_objects


@pytest.fixture
def make_objects():
    return make_training_objects


@pytest.fixture(autouse=True)
def _library_logs_visible(caplog):
    caplog.set_level(logging.INFO, logger="hf_rl_ckpt")
