"""The classification trainer end to end: torchrun on gloo, --test-only, exact resume, failures."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from fixtures_cls import write_image
from kill_and_resume import assert_same_final_weights, kill_after_first_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "cls", "train.py")


def make_folder(root, per_class=8, classes=("a", "b", "c"), size=(40, 36)):
    for split, count in (("train", per_class), ("val", per_class // 2 + 1)):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for k in range(count):
                write_image(root / split / name / f"{k}.png", size, "RGB", seed=1000 * c + 10 * k + (split == "val"))
    return root


def tiny_args(data, out, *extra):
    """ResNet-18 at 32 px on a generated 3-class ImageFolder, through the ImageNet data path."""
    return [
        "MODEL.ARCH", "resnet18", "MODEL.NUM_CLASSES", "3", "DATA.DATASET", "imagenet", "DATA.ROOT", str(data),
        "DATA.CROP_SIZE", "32", "DATA.RESIZE_SIZE", "36", "DATA.BATCH_SIZE", "4", "DATA.WORKERS", "0",
        "TEST.BATCH_SIZE", "5", "SOLVER.EPOCHS", "1", "LOG.PERIOD", "1", "LOG.PROGRESS", "False",
        "OUTPUT_DIR", str(out), *extra,
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, launcher=("python",), timeout=300, check=True, backend=None):
    if launcher[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *args]
    elif launcher[0] == "launch":
        cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}", TRAIN, *args]
    else:
        cmd = [sys.executable, TRAIN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if backend:
        env["MABN_BACKEND"] = backend
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.mark.parametrize("norm,extra", [("bn", []), ("brn", ["MODEL.NORM_OPTIONS", "{warmup_steps: 1}"]), ("syncbn", []),
                                        ("mabn", ["MODEL.NORM_BATCH_SIZE", "2", "MODEL.CENTERED_CONVS", "True"])])
def test_torchrun_two_processes_then_test_only(data, tmp_path, norm, extra):
    out = tmp_path / norm
    # MABN runs the default (fused, compiled) path under DDP; the other norms the reference one (conftest.py)
    backend = "auto" if norm == "mabn" else None
    run(tiny_args(data, out, "MODEL.NORM", norm, *extra), launcher=("torchrun",), backend=backend)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["samples"] == 15  # 3 classes x 5 val images, each counted once
    assert metrics["total_steps"] == 3  # 24 images / (2 ranks x 4)
    assert (out / "config.yaml").exists() and (out / "log.txt").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    test_args = ["--test-only", "--checkpoint", str(out / "model_final.pth")] + tiny_args(data, out, "MODEL.NORM", norm, *extra)
    run(test_args, launcher=("torchrun",), backend=backend)
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["samples"] == 15
    assert evaluated["top1_err"] == pytest.approx(metrics["top1_err"])


def test_deprecated_launcher_with_local_rank_argument(data, tmp_path):
    run(tiny_args(data, tmp_path / "launch", "MODEL.NORM", "bn"), launcher=("launch",))
    assert json.loads((tmp_path / "launch" / "metrics.json").read_text())["finished"]


def test_killed_and_resumed_run_ends_with_the_same_weights(data, tmp_path):
    common = ["MODEL.NORM", "mabn", "MODEL.NORM_BATCH_SIZE", "2", "MODEL.CENTERED_CONVS", "True", "SOLVER.EPOCHS", "4",
              "CHECKPOINT.PERIOD_STEPS", "2", "DATA.WORKERS", "2", "MODEL.NORM_OPTIONS", "{warmup_iters: 2, renorm_warmup_iters: 3, buffer_size: 4}"]
    reference = tmp_path / "uninterrupted"
    run(tiny_args(data, reference, *common), backend="auto")

    interrupted = tmp_path / "interrupted"
    kill_after_first_checkpoint(TRAIN, tiny_args(data, interrupted, *common), interrupted, ROOT)
    resumed = run(tiny_args(data, interrupted, *common), backend="auto")
    assert "resumed from" in resumed.stderr
    assert_same_final_weights(interrupted, reference)


def test_torchvision_resnet50_weights_load_into_the_bn_model(tmp_path):
    from cls.config import get_default_config
    from cls.train import MUST_MATCH, build_model
    from mabn.engine.checkpoint import load_weights
    from mabn.engine.config import ConfigError

    weights = torchvision.models.resnet50().state_dict()
    path = tmp_path / "tv.pth"
    torch.save(weights, path)
    model = build_model(get_default_config())
    load_weights(model, str(path), "MODEL.WEIGHTS")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    mabn_model = build_model(get_default_config().merge_from_list(["MODEL.NORM", "mabn"]))
    with pytest.raises(ConfigError, match=re.escape(f"MODEL.WEIGHTS: cannot load {path} into this ResNet ({MUST_MATCH} must match")):
        load_weights(mabn_model, str(path), "MODEL.WEIGHTS", MUST_MATCH)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["SOLVER.BASE_LRR", "0.1"], "unknown config key 'SOLVER.BASE_LRR' in the command line (did you mean 'SOLVER.BASE_LR'?)"),
        (["SOLVER.EPOCHS", "many"], "config key 'SOLVER.EPOCHS' in the command line expects an integer, got 'many'"),
        (["MODEL.NORM", "mabn", "MODEL.NORM_BATCH_SIZE", "3"], "MODEL.NORM_BATCH_SIZE=3 must be a positive divisor of DATA.BATCH_SIZE=4"),
        (["MODEL.NORM", "gn", "MODEL.NORM_BATCH_SIZE", "2"], "MODEL.NORM_BATCH_SIZE applies to bn, brn, mabn, not MODEL.NORM 'gn'"),
    ],
)
def test_config_errors(data, tmp_path, overrides, message):
    result = run(tiny_args(data, tmp_path / "x", *overrides), check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_data_directory(tmp_path):
    result = run(tiny_args(tmp_path / "nowhere", tmp_path / "x"), check=False)
    assert result.returncode != 0 and f"{tmp_path / 'nowhere'}" in result.stderr


def test_corrupt_image_fails_naming_the_file_and_ends_the_distributed_job(tmp_path):
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "b" / "3.png"
    bad.write_bytes(b"not an image at all")
    started = time.time()
    result = run(tiny_args(data, tmp_path / "x", "SOLVER.EPOCHS", "2"), launcher=("torchrun",), check=False, timeout=240)
    assert result.returncode != 0
    assert str(bad) in result.stdout + result.stderr
    assert time.time() - started < 200  # the surviving rank was stopped, not left waiting
    ok = run(tiny_args(data, tmp_path / "skip", "DATA.SKIP_CORRUPT", "True"))
    assert "3.png" in ok.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    result = run(tiny_args(data, out, "SOLVER.EPOCHS", "3", "SOLVER.BASE_LR", "1e12", "CHECKPOINT.PERIOD_STEPS", "1"), check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.lower()
    assert "loss is nan" in message or "loss is inf" in message
    assert f"The last good checkpoint is {out / 'checkpoint.pth'}" in result.stderr
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] >= 1 and not (out / "model_final.pth").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fashion_mnist_short_run_learns(tmp_path):
    """Real data: 250 steps of a ResNet-20 with MABN at b = 2 on Fashion-MNIST (measured ~20% test error)."""
    out = tmp_path / "fm"
    run(["--config", os.path.join(ROOT, "configs", "cls", "fashion_mnist", "mabn_b2.yaml"), "SOLVER.MAX_STEPS", "250",
         "DATA.WORKERS", "1", "LOG.PROGRESS", "False", "OUTPUT_DIR", str(out)], timeout=600, backend="auto")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 10000
    assert metrics["top1_err"] < 35.0, metrics


def test_unreadable_checkpoints_are_named(data, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is no checkpoint")
    result = run(["--test-only", "--checkpoint", str(garbage), *tiny_args(data, tmp_path / "t")], check=False)
    assert result.returncode == 2 and f"--checkpoint: cannot read checkpoint {garbage}" in result.stderr, result.stderr[-3000:]
    result = run(tiny_args(data, tmp_path / "w", "MODEL.WEIGHTS", str(tmp_path / "gone.pth")), check=False)
    assert result.returncode == 2 and f"MODEL.WEIGHTS: checkpoint not found: {tmp_path / 'gone.pth'}" in result.stderr


def test_unreadable_resume_checkpoint_is_named_and_kept(data, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    garbage = out / "checkpoint.pth"  # the run directory's own checkpoint: resumed from automatically
    garbage.write_bytes(b"this is no checkpoint")
    result = run(tiny_args(data, out), check=False)
    assert result.returncode == 2 and f"--resume: cannot read checkpoint {garbage}" in result.stderr, result.stderr[-3000:]
    assert garbage.read_bytes() == b"this is no checkpoint"  # left for the user to inspect, not overwritten


# ----------------------------------------------------------------------------------------------- fine-tuning, outputs
def call(args, capsys):
    """cls/train.py's main() in this process (no interpreter start-up): exit code and everything it printed."""
    from cls.train import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_finetune_from_torchvision_weights_with_another_norm_and_classifier(data, tmp_path, capsys):
    """A torchvision ResNet-18 state_dict (BN, 1000 classes) starts a MABN run with 3 classes and trains a step
    (at lr 0, so that what was loaded is still there at the end), evaluated on a subset of the validation set."""
    weights = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    out = tmp_path / "ft"
    code, output = call(tiny_args(data, out, "MODEL.NORM", "mabn", "MODEL.CENTERED_CONVS", "True", "MODEL.WEIGHTS", str(path),
                                  "SOLVER.MAX_STEPS", "1", "SOLVER.BASE_LR", "0.0", "TEST.MAX_IMAGES", "7", "LOG.PROGRESS", "True"), capsys)
    assert code == 0, output[-3000:]
    assert f"MODEL.WEIGHTS {path}: " in output and "20 norm statistics translated to the model's norms" in output
    assert "new (initialized here): fc.* (2 keys)" in output and "fc.weight (checkpoint shape (1000, 512), model (3, 512))" in output
    assert "epoch 0:" in output and "| 0/1 [" in output  # the bar ends at SOLVER.MAX_STEPS 1, not at the epoch's 6 steps
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias"):
        assert torch.equal(final[key], weights[key]), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 7 and metrics["total_steps"] == 1  # 7 of the 15 validation images

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"    WEIGHTS: {path}" in text and "    NORM: mabn" in text  # the resolved config, as a code block
    hparams = events.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/top1_err", "val/top5_err"]
    run_hparams = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info.hparams
    assert run_hparams["MODEL.NORM"].string_value == "mabn" and run_hparams["TEST.MAX_IMAGES"].number_value == 7

    code, output = call(tiny_args(data, tmp_path / "x", "MODEL.ARCH", "resnet20", "MODEL.WEIGHTS", str(path)), capsys)
    assert code == 2 and f"MODEL.WEIGHTS: cannot load {path} into this CifarResNet (MODEL.ARCH and IN_CHANNELS must match" in output


def test_progress_bar_ends_where_the_run_stops():
    from cls.train import Progress, Schedule

    assert Schedule(steps_per_epoch=937, total_steps=20).epoch_end(Progress()) == 20
    assert Schedule(937, 1874).epoch_end(Progress(epoch=1, batch_in_epoch=5, step=942)) == 937
    assert Schedule(937, 1000).epoch_end(Progress(epoch=1, batch_in_epoch=5, step=942)) == 63  # resumed inside the last epoch


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["MODEL.NORM_OPTIONS.momentum", "3.0"],
         "error: MODEL.NORM 'bn' / MODEL.NORM_OPTIONS {'momentum': 3.0}: BatchNorm2d: momentum (update rate of the "
         "running statistics) must be in [0, 1] or None, got 3.0"),
        (["MODEL.NORM", "mabn", "MODEL.NORM_OPTIONS.buffer", "4"], "MODEL.NORM_OPTIONS {'buffer': 4}: norm 'mabn' does not accept option(s) ['buffer']"),
        (["TEST.BATCH_SIZE", "0"], "config error: config key 'TEST.BATCH_SIZE' in the command line must be an integer > 0, got 0"),
        (["SOLVER.BASE_LR", "-0.1"], "config key 'SOLVER.BASE_LR' in the command line must be a finite number >= 0, got -0.1"),
    ],
)
def test_values_that_torch_or_a_norm_would_refuse_are_config_errors(data, tmp_path, capsys, overrides, message):
    """Exit code 2 and the key named, not a traceback from a layer, SGD or the DataLoader (issue 13)."""
    code, output = call(tiny_args(data, tmp_path / "x", *overrides), capsys)
    assert code == 2 and message in output, output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "x" / "checkpoint.pth").exists()


def test_a_fashion_mnist_root_without_the_files_is_refused(tmp_path, capsys):
    """The loader falls back to the installed copy; a DATA.ROOT that was given must be the one read."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = call(["DATA.DATASET", "fashion_mnist", "MODEL.ARCH", "resnet20", "MODEL.NUM_CLASSES", "10", "MODEL.IN_CHANNELS", "1",
                         "DATA.ROOT", str(empty), "DATA.WORKERS", "0", "LOG.PROGRESS", "False", "OUTPUT_DIR", str(tmp_path / "x")], capsys)
    assert code == 2, output[-3000:]
    assert f"DATA.DATASET 'fashion_mnist', DATA.ROOT '{empty}': root {empty} holds no Fashion-MNIST files" in output
