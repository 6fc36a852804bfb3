import os
import sys

import pytest
import torch

# The repository root (cls/, det/ and mabn/ are imported from the checkout, not installed) and the test helpers
# (the loop re-implementation of the algorithm, data generators) that live beside the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(__file__))

# The fused kernels are compiled once per layer configuration (seconds each on two cores). Most tests check
# behaviour, not speed, so they run the reference path, which test_fused.py and test_mabn_spec.py hold the
# fused one equal to; the tests that exercise the default path end to end set MABN_BACKEND=auto themselves.
# Subprocesses (torchrun runs of the trainers) inherit the setting.
os.environ.setdefault("MABN_BACKEND", "reference")


def pytest_addoption(parser):
    # The layer tests that take the `device` fixture build their layers on the CPU, as users do, and move layers
    # and data to this device: scripts/gpu_check.py runs them with --device cuda.
    parser.addoption("--device", default="cpu", help="device of the tests that take the `device` fixture (default: cpu)")


def pytest_configure(config):
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: CUDA is not available here")


@pytest.fixture
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))
