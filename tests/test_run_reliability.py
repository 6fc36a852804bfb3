"""What a run has earned is never lost (issue 13): the checkpoint is saved before evaluating and never with NaN/Inf
in the model, "finished" is written last, a full disk is named, one trainer per OUTPUT_DIR, a resume that changes
what the checkpoint means is refused, config.yaml only for an accepted run, results files readable by all.

Each test runs the classification trainer in this process on a tiny synthetic set (4 steps an epoch) and checks
the message and the files left on disk."""
import errno
import json
import math
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

import mabn.engine.output_dir as output_dir
from mabn.engine.checkpoint import load_checkpoint, save_checkpoint
from mabn.engine.output_dir import OutputDirLock, OutputDirLockedError, OutputError, run_finished


def tiny_args(out, *extra):
    return ["MODEL.ARCH", "resnet20", "MODEL.NUM_CLASSES", "3", "DATA.DATASET", "synthetic", "DATA.SYNTHETIC_SAMPLES", "16",
            "DATA.SYNTHETIC_IMAGE_SIZE", "8", "DATA.BATCH_SIZE", "4", "DATA.WORKERS", "0", "TEST.BATCH_SIZE", "8",
            "SOLVER.EPOCHS", "1", "LOG.PERIOD", "1", "LOG.PROGRESS", "False", "DEVICE", "cpu", "OUTPUT_DIR", str(out), *extra]


def call(args, capsys):
    from cls.train import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def step_of(path):
    return load_checkpoint(str(path))["step"]


def finite(path):
    return all(torch.isfinite(v).all() for v in load_checkpoint(str(path))["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- evaluation after the save
def test_a_failing_evaluation_keeps_the_checkpoint_and_the_rerun_evaluates(tmp_path, capsys, monkeypatch):
    import cls.train

    out = tmp_path / "run"
    evaluate = cls.train.evaluate

    def broken(*args, **kwargs):
        raise OSError("cannot read image val/3.png")

    monkeypatch.setattr(cls.train, "evaluate", broken)
    with pytest.raises(OSError, match="val/3.png"):
        call(tiny_args(out), capsys)
    assert step_of(out / "checkpoint.pth") == 4  # the epoch it trained is saved
    assert not (out / "model_final.pth").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(cls.train, "evaluate", evaluate)
    code, output = call(tiny_args(out), capsys)
    assert code == 0, output[-3000:]
    assert "resumed from" in output and "eval epoch 1" in output  # the evaluation that failed, repeated
    assert json.loads((out / "metrics.json").read_text())["finished"] and run_finished(str(out))


# ----------------------------------------------------------------------------- non-finite model
def test_a_model_with_nan_statistics_is_never_saved(tmp_path, capsys, monkeypatch):
    """A finite loss, but BN statistics that became NaN in the second epoch: the epoch-1 checkpoint stays, named."""
    import cls.train

    out = tmp_path / "nan"
    train_one_epoch = cls.train.train_one_epoch

    def poisoning(model, *args, **kwargs):
        train_one_epoch(model, *args, **kwargs)
        progress = args[6]
        if progress.epoch == 2:
            model.bn1.running_var.fill_(math.nan)

    monkeypatch.setattr(cls.train, "train_one_epoch", poisoning)
    code, output = call(tiny_args(out, "SOLVER.EPOCHS", "3"), capsys)
    assert code == 3
    assert "the model holds NaN/Inf values at epoch 2, batch_in_epoch 0, step 8: bn1.running_var; not saved" in output
    assert f"The last good checkpoint is {out / 'checkpoint.pth'}, from epoch 1, batch_in_epoch 0, step 4" in output
    assert step_of(out / "checkpoint.pth") == 4 and finite(out / "checkpoint.pth")
    assert not (out / "model_final.pth").exists()
    assert not json.loads((out / "metrics.json").read_text())["finished"]


# ----------------------------------------------------------------------------- disk full
class FullDisk:
    """A file on a disk that fills up after ``room`` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_for(monkeypatch, name_part, room=100):
    real_open = open

    def opening(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f, room) if name_part in os.path.basename(path) and "w" in mode else f

    monkeypatch.setattr(output_dir, "open", opening, raising=False)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, str(path))
    fill_disk_for(monkeypatch, "checkpoint.pth")
    with pytest.raises(OutputError) as raised:  # torch.save alone says "inline_container.cc ... unexpected pos"
        save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, str(path))
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"cannot write {path}: no space left on device; the previous checkpoint.pth is kept"
    assert load_checkpoint(str(path))["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_a_full_disk_at_the_final_save_does_not_write_finished(tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    fill_disk_for(monkeypatch, "model_final.pth")
    code, output = call(tiny_args(out), capsys)
    assert code == 2
    assert f"cannot write {out / 'model_final.pth'}: no space left on device" in output
    assert not json.loads((out / "metrics.json").read_text())["finished"] and not run_finished(str(out))
    assert step_of(out / "checkpoint.pth") == 4 and not (out / "model_final.pth").exists()
    monkeypatch.undo()
    code, output = call(tiny_args(out), capsys)  # the rerun completes what is missing
    assert code == 0 and run_finished(str(out)), output[-3000:]


# ----------------------------------------------------------------------------- one trainer per OUTPUT_DIR
def write_lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "since": "then"}))


def test_a_second_trainer_is_refused_while_the_first_is_alive(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = os.getppid()  # alive for as long as this test runs
    write_lock(out, holder)
    code, output = call(tiny_args(out), capsys)
    assert code == 2
    assert f"OUTPUT_DIR {out} is in use by another trainer (pid {holder} on host {socket.gethostname()}" in output
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written: no config.yaml, log, checkpoint
    assert json.loads((out / ".lock").read_text())["pid"] == holder  # the holder's lock is left alone


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    out = tmp_path / "stale"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(out, dead.pid)
    code, output = call(tiny_args(out), capsys)
    assert code == 0, output[-3000:]
    assert run_finished(str(out)) and not (out / ".lock").exists()


def test_a_lock_of_another_host_is_refused_until_its_heartbeat_is_old(tmp_path):
    out = tmp_path / "remote"
    write_lock(out, 1, host="elsewhere")
    with pytest.raises(OutputDirLockedError, match="pid 1 on host elsewhere"):
        OutputDirLock(str(out)).acquire()
    old = os.path.getmtime(out / ".lock") - output_dir.STALE_AFTER_S - 1
    os.utime(out / ".lock", (old, old))
    lock = OutputDirLock(str(out)).acquire()
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------- resuming another configuration
def test_a_resume_that_changes_the_batch_size_is_refused_and_config_yaml_kept(tmp_path, capsys):
    out = tmp_path / "resume"
    code, output = call(tiny_args(out, "SOLVER.EPOCHS", "2", "SOLVER.MAX_STEPS", "4"), capsys)
    assert code == 0, output[-3000:]
    config = (out / "config.yaml").read_bytes()
    checkpoint = (out / "checkpoint.pth").read_bytes()
    code, output = call(tiny_args(out, "SOLVER.EPOCHS", "2", "DATA.BATCH_SIZE", "2"), capsys)
    assert code == 2
    assert "was saved by a run with another configuration; changed: DATA.BATCH_SIZE: 4 -> 2; SOLVER.MAX_STEPS: 4 -> None" in output
    assert "CHECKPOINT.RESUME_CHANGED_CONFIG True" in output
    assert (out / "config.yaml").read_bytes() == config and (out / "checkpoint.pth").read_bytes() == checkpoint
    code, output = call(tiny_args(out, "SOLVER.EPOCHS", "2", "CHECKPOINT.RESUME_CHANGED_CONFIG", "True"), capsys)
    assert code == 0, output[-3000:]
    assert "resuming with a changed configuration (CHECKPOINT.RESUME_CHANGED_CONFIG): SOLVER.MAX_STEPS: 4 -> None" in output
    assert step_of(out / "checkpoint.pth") == 8 and b"RESUME_CHANGED_CONFIG: true" in (out / "config.yaml").read_bytes()


# ----------------------------------------------------------------------------- file modes
def test_results_files_respect_the_umask(tmp_path, capsys):
    out = tmp_path / "modes"
    previous = os.umask(0o022)
    try:
        code, output = call(tiny_args(out), capsys)
    finally:
        os.umask(previous)
    assert code == 0, output[-3000:]
    for name in ("metrics.json", "checkpoint.pth", "model_final.pth", "config.yaml"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------- the detection trainer
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_detection_final_evaluation_failure_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    """The final evaluation of the detection trainer fails (an unreadable validation image): the trained iterations
    are in checkpoint.pth, nothing claims the run is finished, and the rerun evaluates and finishes it."""
    import det.train
    from det.synthetic_shapes import make_shapes_dataset
    from test_det_train import tiny_args as det_args

    shapes = make_shapes_dataset(str(tmp_path / "shapes"), num_train=4, num_val=2)
    out = tmp_path / "det"
    evaluate = det.train.evaluate

    def broken(*args, **kwargs):
        raise FileNotFoundError("image file not found: val/1.png")

    monkeypatch.setattr(det.train, "evaluate", broken)
    args = det_args("scratch_mabn_2.yaml", shapes, out, "SOLVER.MAX_ITER", "2")
    with pytest.raises(FileNotFoundError, match="val/1.png"):
        det.train.main(args)
    assert load_checkpoint(str(out / "checkpoint.pth"))["iter"] == 2
    assert not (out / "model_final.pth").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(det.train, "evaluate", evaluate)
    assert det.train.main(args) == 0, capsys.readouterr().err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["iter"] == 2 and run_finished(str(out))


# ----------------------------------------------------------------------------- the validation set, checked up front
def test_a_broken_validation_image_is_named_before_any_training(tmp_path, capsys):
    from test_cls_train import make_folder, tiny_args as folder_args

    data = make_folder(tmp_path / "data", per_class=2)
    bad = data / "val" / "b" / "1.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "val"
    code, output = call(folder_args(data, out, "DATA.BATCH_SIZE", "2", "DEVICE", "cpu"), capsys)
    assert code == 2
    assert f"DATA.VAL_SPLIT 'val' of DATA.ROOT {str(data)!r}: cannot read image {bad}" in output
    assert "DATA.SKIP_CORRUPT True skips broken images" in output
    assert sorted(os.listdir(out)) == ["log.txt", "tensorboard"]  # no checkpoint, no config.yaml, no metrics


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_a_missing_detection_validation_image_is_named_before_any_training(tmp_path, capsys):
    import det.train
    from det.synthetic_shapes import make_shapes_dataset
    from test_det_train import tiny_args as det_args

    shapes = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=2)
    annotations = json.loads(open(os.path.join(shapes, "annotations", "instances_val2017.json")).read())
    missing = os.path.join(shapes, "val2017", annotations["images"][1]["file_name"])
    os.remove(missing)
    out = tmp_path / "det"
    code = det.train.main(det_args("scratch_mabn_2.yaml", shapes, out))
    output = capsys.readouterr().err
    assert code == 2 and f"image file not found: {missing}" in output and "DATA.VAL_IMAGES" in output, output[-3000:]
    assert not (out / "checkpoint.pth").exists() and not (out / "config.yaml").exists()


def test_changed_keys_compare_whole_sections():
    from cls.config import get_default_config
    from mabn.engine.checkpoint import changed_keys

    saved = get_default_config().dump()
    now = get_default_config().merge_from_list(["MODEL.NORM_OPTIONS", "{warmup_iters: 2}", "SOLVER.BASE_LR", "0.5"])
    assert changed_keys(saved, now, ("MODEL.NORM_OPTIONS", "SOLVER.EPOCHS")) == ["MODEL.NORM_OPTIONS: {} -> {'warmup_iters': 2}"]
    assert changed_keys("", now, ("MODEL.NORM_OPTIONS",)) == []  # a checkpoint without a config: nothing to compare


def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    clash = tmp_path / "clash"
    clash.write_text("a file, not a directory")
    code, output = call(tiny_args(clash), capsys)
    assert code == 2 and f"OUTPUT_DIR {clash} cannot be used: a file, not a directory" in output, output[-2000:]
    assert clash.read_text() == "a file, not a directory"
