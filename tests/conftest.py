import os
import sys

# The repository root (cls/, det/ and mabn/ are imported from the checkout, not installed) and the test helpers
# (the loop re-implementation of the algorithm, data generators) that live beside the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(__file__))

# The fused kernels are compiled once per layer configuration (seconds each on two cores). Most tests check
# behaviour, not speed, so they run the reference path, which test_fused.py and test_mabn_spec.py hold the
# fused one equal to; the tests that exercise the default path end to end set MABN_BACKEND=auto themselves.
# Subprocesses (torchrun runs of the trainers) inherit the setting.
os.environ.setdefault("MABN_BACKEND", "reference")
