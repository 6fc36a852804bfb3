"""What both trainers' kill-and-resume tests do: SIGKILL a run right after its first checkpoint, and compare
the final weights of the resumed run with those of an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch


def kill_after_first_checkpoint(script: str, args: list[str], out, cwd: str) -> None:
    """Run ``script args`` (fused MABN backend) and SIGKILL it as soon as ``out/checkpoint.pth`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_BACKEND": "auto"}
    proc = subprocess.Popen([sys.executable, script, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.pth").exists() and not (out / "model_final.pth").exists(), "the kill came too late"


def assert_same_final_weights(ours, theirs) -> None:
    """``model_final.pth`` of the run directories ``ours`` and ``theirs`` hold bit-identical weights."""
    a, b = (torch.load(out / "model_final.pth", weights_only=True)["model"] for out in (ours, theirs))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
