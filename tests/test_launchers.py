"""The table launchers (scripts/reproduce_imagenet.sh, reproduce_coco.sh): bad arguments are refused with a
message, finished runs are skipped, and a fine-tune row names the backbone it lacks. No training runs here."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def finished_run(directory, final_model=True):
    """A run directory as a finished run leaves it: ``"finished": true`` in metrics.json beside model_final.pth."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump({"finished": True, "top1_err": 30.0, "top5_err": 10.0}, f)
    if final_model:
        with open(os.path.join(directory, "model_final.pth"), "wb") as f:
            f.write(b"weights")


@pytest.mark.parametrize("final_model,finished", [(True, True), (False, False)])
def test_a_run_is_finished_only_with_its_final_model(tmp_path, final_model, finished):
    """The flag alone (a disk-full final save leaves it without model_final.pth) does not make a launcher skip the
    run; the shell test and mabn.engine.output_dir.run_finished agree."""
    from mabn.engine.output_dir import run_finished

    finished_run(tmp_path / "run", final_model)
    result = subprocess.run(["bash", "-c", f"source scripts/torchrun_table.sh && finished {tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert (result.returncode == 0) is finished, result.stderr
    assert run_finished(str(tmp_path / "run")) is finished


@pytest.fixture
def imagenet(tmp_path):
    for split in ("train", "val"):
        os.makedirs(tmp_path / "imagenet" / split)
    return tmp_path / "imagenet"


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    for folder in ("train2017", "val2017", "annotations"):
        os.makedirs(root / folder)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text("{}")
    return root


@pytest.mark.parametrize("args,message", [
    ([], "--data /path/to/imagenet (with train/ and val/) is required"),
    (["--data", "/nowhere"], "/nowhere must hold train/ and val/ ImageFolders"),
    (["--bogus"], "unknown option --bogus"),
])
def test_imagenet_launcher_refuses_bad_arguments(args, message):
    result = launch("reproduce_imagenet.sh", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_imagenet_launcher_refuses_an_unknown_table(imagenet):
    result = launch("reproduce_imagenet.sh", "--data", imagenet, "--table", "bogus")
    assert result.returncode == 2 and "--table must be batch, baselines, ablation or all" in result.stderr


def test_imagenet_launcher_skips_finished_runs_then_collects(imagenet, tmp_path):
    out = tmp_path / "runs"
    for name in ("gn", "ln", "in"):
        finished_run(out / name)
    result = launch("reproduce_imagenet.sh", "--data", imagenet, "--out", out, "--table", "baselines")
    assert result.returncode == 0, result.stderr
    for name in ("gn", "ln", "in"):
        assert f"== {name}: finished, skipped" in result.stdout
    assert "| GN | 30.00 | 10.00 |" in result.stdout  # the collector's table of what the runs wrote


def test_coco_launcher_refuses_a_root_without_annotations(tmp_path):
    os.makedirs(tmp_path / "coco" / "train2017")
    result = launch("reproduce_coco.sh", "--data", tmp_path / "coco")
    assert result.returncode == 2 and f"{tmp_path / 'coco'}/val2017 not found: --data must be a COCO 2017 root" in result.stderr


def test_coco_launcher_names_the_missing_backbone_of_an_unfinished_finetune_row(coco, tmp_path):
    out = tmp_path / "runs"
    finished_run(out / "finetune_syncbn_2x8")  # finished: needs no --torchvision-r50
    result = launch("reproduce_coco.sh", "--data", coco, "--out", out, "--table", "finetune",
                    "--imagenet-mabn", tmp_path / "absent.pth")
    assert "== finetune_syncbn_2x8: finished, skipped" in result.stdout
    assert result.returncode == 2
    assert "finetune_mabn_2 needs the ImageNet MABN ResNet-50 (--imagenet-mabn; " in result.stderr
    assert f"{tmp_path / 'absent.pth'} not found" in result.stderr
