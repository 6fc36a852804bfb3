import os
import sys

# Test helpers (the loop re-implementation of the spec, data generators) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# The fused kernels are compiled once per layer configuration (seconds each on two cores). Most tests check
# behaviour, not speed, so they run the reference path, which test_fused.py and test_mabn_spec.py hold the
# fused one equal to; the tests that exercise the default path end to end set MABN_BACKEND=auto themselves.
# Subprocesses (torchrun runs of the trainers) inherit the setting.
os.environ.setdefault("MABN_BACKEND", "reference")
