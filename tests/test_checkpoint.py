"""Checkpoints: atomic writes, weights_only reads, clear errors for unreadable files, RNG round trips."""
import os
import random

import numpy as np
import pytest
import torch

from mabn.engine.checkpoint import (
    CheckpointError, load_checkpoint, load_training_checkpoint, model_state_dict, own_rank_state, rank_state, rng_states,
    save_checkpoint, save_training_checkpoint, set_rng_states,
)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, str(path))
    before = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(str(path))["step"] == 1


class NotATensor:
    pass


def test_loading_is_weights_only_and_errors_name_the_file(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {}, "payload": NotATensor()}, pickled)  # arbitrary objects need unpickling code
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {pickled}"):
        load_checkpoint(str(pickled))
    truncated = tmp_path / "truncated.pth"
    save_checkpoint({"w": torch.randn(1000)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {truncated}"):
        load_checkpoint(str(truncated))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*absent.pth"):
        load_checkpoint(str(tmp_path / "absent.pth"))
    listed = tmp_path / "list.pth"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_checkpoint(str(listed))


def test_model_state_dict_accepts_trainer_checkpoints_and_bare_state_dicts():
    weights = {"module.fc.weight": torch.ones(2), "module.fc.bias": torch.zeros(2)}
    assert set(model_state_dict({"model": weights, "step": 3})) == {"fc.weight", "fc.bias"}
    assert set(model_state_dict(weights)) == {"fc.weight", "fc.bias"}
    with pytest.raises(CheckpointError, match="neither a trainer checkpoint"):
        model_state_dict({"model": {"a": 1}}, "x.pth")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pth"
    save_checkpoint({"rng": rng_states()}, str(path))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_states(load_checkpoint(str(path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rank_state_holds_buffers_not_parameters():
    model = torch.nn.BatchNorm2d(3)
    state = rank_state(model)
    assert set(state["buffers"]) == {"running_mean", "running_var", "num_batches_tracked"}
    checkpoint = {"ranks": [state, state]}
    assert own_rank_state(checkpoint, 1, 2) is state
    assert own_rank_state(checkpoint, 0, 4) is None  # saved by another number of processes


def _run_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step(), scheduler.step()
    return model, optimizer, scheduler, scaler


def test_training_checkpoint_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    model, optimizer, scheduler, scaler = _run_state(0)
    save_training_checkpoint(path, True, model, optimizer, scheduler, scaler, {"step": 7, "epoch": 1}, "A: 1\n", {"top1": 3.0})
    expected = torch.rand(1)  # what the generator draws next, after a resume
    other = _run_state(1)
    resumed = load_training_checkpoint(path, 0, 1, *other, ("step", "epoch"))
    assert (resumed.counters, resumed.metrics, resumed.exact) == ({"step": 7, "epoch": 1}, {"top1": 3.0}, True)
    for a, b in zip(model.state_dict().values(), other[0].state_dict().values()):
        assert torch.equal(a, b)
    assert other[1].state_dict()["state"][0]["momentum_buffer"].equal(optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert other[2].last_epoch == scheduler.last_epoch and torch.equal(torch.rand(1), expected)
    assert load_training_checkpoint(path, 1, 2, *other, ("step",)).exact is False  # saved by 1 process, resumed by 2
    with pytest.raises(CheckpointError, match=r"is not a checkpoint of this trainer \(missing \['iter'\]\)"):
        load_training_checkpoint(path, 0, 1, *other, ("iter",))


def test_resuming_into_a_model_with_another_norm_is_a_checkpoint_error_naming_the_file(tmp_path):
    """Not torch's bare 'Error(s) in loading state_dict' traceback: the trainers turn CheckpointError into a config
    error (exit code 2) naming --resume (issue 13)."""
    import mabn

    path = str(tmp_path / "checkpoint.pth")
    save_training_checkpoint(path, True, *_run_state(0), {"step": 7}, "A: 1\n", {})
    model, optimizer, scheduler, scaler = _run_state(1)
    model[1] = mabn.MABN1d(3)  # the run resumed with MODEL.NORM mabn
    with pytest.raises(CheckpointError, match=rf"{path} does not fit this model: it was written by a run with another model "
                                              r"\(MODEL.NORM, .*\n.*Error\(s\) in loading state_dict (.|\n)*Unexpected key\(s\)"):
        load_training_checkpoint(path, 0, 1, model, optimizer, scheduler, scaler, ("step",))
