import os
import sys

# Test helpers (the loop re-implementation of the spec, data generators) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
