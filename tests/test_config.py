"""The shared YAML config system: defaults in code, _BASE_ inheritance, KEY VALUE overrides, strict checks."""
import importlib
import os
import re

import pytest
import yaml

from mabn.engine.config import CfgNode, ConfigError, load_config, one_of, optional


def _defaults():
    return CfgNode({
        "OUTPUT_DIR": "runs/x",
        "MODEL": {"NORM": one_of("bn", "brn", "mabn"), "NORM_BATCH_SIZE": optional(int), "NORM_OPTIONS": CfgNode({}, new_allowed=True)},
        "SOLVER": {"BASE_LR": 0.1, "STEPS": [30, 60], "AMP": False, "EPOCHS": 120},
    })


def _write(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_file_bases_and_overrides_compose(tmp_path):
    base = _write(tmp_path / "base.yaml", {"SOLVER": {"BASE_LR": 0.2, "EPOCHS": 90}, "MODEL": {"NORM_OPTIONS": {"buffer_size": 16}}})
    os.makedirs(tmp_path / "rows")
    row = _write(tmp_path / "rows" / "row.yaml", {"_BASE_": "../base.yaml", "MODEL": {"NORM": "mabn", "NORM_BATCH_SIZE": 2, "NORM_OPTIONS": {"warmup_iters": 10}}})
    cfg = load_config(_defaults(), row, ["SOLVER.BASE_LR", "1e-3", "OUTPUT_DIR", "runs/y", "SOLVER.STEPS", "[10, 20]"])
    assert cfg.SOLVER.BASE_LR == 0.001 and cfg.SOLVER.EPOCHS == 90 and cfg.SOLVER.STEPS == [10, 20]
    assert cfg.MODEL.NORM == "mabn" and cfg.MODEL.NORM_BATCH_SIZE == 2
    assert dict(cfg.MODEL.NORM_OPTIONS) == {"buffer_size": 16, "warmup_iters": 10}
    assert cfg.OUTPUT_DIR == "runs/y"
    assert load_config(_defaults(), row, ["OUTPUT_DIR", ""]).OUTPUT_DIR == ""  # `KEY ""` clears a string, not null
    assert load_config(_defaults(), row, ["MODEL.NORM_BATCH_SIZE", "null"]).MODEL.NORM_BATCH_SIZE is None
    assert base  # the base file itself is untouched by loading
    saved = tmp_path / "out" / "config.yaml"
    cfg.save(str(saved))
    assert yaml.safe_load(saved.read_text())["SOLVER"]["BASE_LR"] == 0.001
    # the resolved config reloads to itself
    assert load_config(_defaults(), str(saved)).to_dict() == cfg.to_dict()


def test_defaults_are_not_shared_between_loads():
    defaults = _defaults()
    load_config(defaults, None, ["SOLVER.BASE_LR", "0.5"])
    assert defaults.SOLVER.BASE_LR == 0.1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["SOLVER.BASE_LRR", "0.1"], r"unknown config key 'SOLVER.BASE_LRR' in the command line \(did you mean 'SOLVER.BASE_LR'\?\)"),
        (["SOLVR.BASE_LR", "0.1"], r"unknown config key 'SOLVR' in the command line \(did you mean 'SOLVER'\?\)"),
        (["SOLVER.EPOCHS", "ten"], r"config key 'SOLVER.EPOCHS' in the command line expects an integer, got 'ten'"),
        (["SOLVER.EPOCHS", "1.5"], r"'SOLVER.EPOCHS' in the command line expects an integer, got 1.5"),
        (["SOLVER.AMP", "1"], r"'SOLVER.AMP' in the command line expects a boolean"),
        (["SOLVER.STEPS", "[a, 2]"], r"'SOLVER.STEPS\[0\]' in the command line expects an integer"),
        (["MODEL.NORM", "mabm"], r"'MODEL.NORM' in the command line: 'mabm' is not one of \['bn', 'brn', 'mabn'\] \(did you mean 'mabn'\?\)"),
        (["MODEL.NORM_BATCH_SIZE", "two"], r"'MODEL.NORM_BATCH_SIZE' in the command line expects an integer"),
        (["SOLVER.BASE_LR"], r"KEY VALUE pairs; 'SOLVER.BASE_LR' has no value"),
        (["SOLVER", "3"], r"config key 'SOLVER' in the command line is a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_defaults(), None, overrides)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(_defaults(), str(tmp_path / "absent.yaml"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("SOLVER: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(_defaults(), str(bad_yaml))
    typo = _write(tmp_path / "typo.yaml", {"SOLVER": {"EPOCH": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'SOLVER.EPOCH' in .*typo.yaml \(did you mean 'SOLVER.EPOCHS'\?\)"):
        load_config(_defaults(), typo)
    loop_a = _write(tmp_path / "a.yaml", {"_BASE_": "b.yaml"})
    _write(tmp_path / "b.yaml", {"_BASE_": "a.yaml"})
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(_defaults(), loop_a)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_defaults(), str(listed))


def test_frozen_config_refuses_writes():
    cfg = load_config(_defaults(), None)
    with pytest.raises(ConfigError, match="frozen"):
        cfg.SOLVER.BASE_LR = 0.3


# ----------------------------------------------------------------------------- the trainers' command line
def test_detectron2_spellings_and_flags_after_the_overrides():
    from mabn.engine.launch import parse_args

    args = parse_args(["--config-file", "a.yaml", "SOLVER.EPOCHS", "2", "--eval-only", "--checkpoint", "m.pth", "OUTPUT_DIR", "o"], "")
    assert (args.config, args.test_only, args.checkpoint, args.opts) == ("a.yaml", True, "m.pth", ["SOLVER.EPOCHS", "2", "OUTPUT_DIR", "o"])
    args = parse_args(["--config", "a.yaml", "SOLVER.EPOCHS", "2", "--resume"], "")
    assert (args.resume, args.opts) == ("", ["SOLVER.EPOCHS", "2"])
    args = parse_args(["--resume", "OUTPUT_DIR", "runs/x", "SOLVER.STEPS", "[-1, 2]", "SOLVER.BASE_LR", "-0.5"], "")
    assert (args.resume, args.opts) == ("", ["OUTPUT_DIR", "runs/x", "SOLVER.STEPS", "[-1, 2]", "SOLVER.BASE_LR", "-0.5"])
    assert parse_args(["--resume", "runs/x/checkpoint.pth", "SEED", "1"], "").resume == "runs/x/checkpoint.pth"


def test_a_flag_in_place_of_a_value_is_refused_saying_so(capsys):
    from mabn.engine.launch import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["SOLVER.EPOCHS", "--resume"], "")
    assert exit_.value.code == 2
    assert "SOLVER.EPOCHS has no value (--resume is a flag: give KEY VALUE pairs, flags before, between or after them)" in capsys.readouterr().err


def test_print_config_lists_every_key_with_its_default(capsys):
    from cls.config import get_default_config
    from cls.train import main

    assert main(["--print-config"]) == 0  # without DATA.ROOT, which training on ImageNet would need
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == get_default_config().to_dict()
    assert main(["SOLVER.EPOCHS", "3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["SOLVER"]["EPOCHS"] == 3


# ------------------------------------------------------------------ value ranges (issue 13)
def _ranged():
    from mabn.engine.config import in_range, non_negative, positive

    return CfgNode({
        "SOLVER": {"BASE_LR": non_negative(0.1), "EPOCHS": positive(120), "MOMENTUM": in_range(0.9, 0.0, 1.0),
                   "WARMUP_FACTOR": in_range(0.1, 0.0, 1.0, low_open=True), "MAX_STEPS": positive(None, kind=int),
                   "GAMMA": 0.1, "AMP": one_of("off", "bf16", "fp16")},
    })


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["SOLVER.BASE_LR", "-0.1"], r"'SOLVER.BASE_LR' in the command line must be a finite number >= 0, got -0.1"),
        (["SOLVER.BASE_LR", "nan"], r"'SOLVER.BASE_LR' in the command line must be a finite number >= 0, got 'nan'"),
        (["SOLVER.BASE_LR", ".inf"], r"'SOLVER.BASE_LR' in the command line must be a finite number >= 0, got inf"),
        (["SOLVER.EPOCHS", "0"], r"'SOLVER.EPOCHS' in the command line must be an integer > 0, got 0"),
        (["SOLVER.EPOCHS", "1.5"], r"'SOLVER.EPOCHS' in the command line expects an integer, got 1.5"),
        (["SOLVER.MOMENTUM", "3.0"], r"'SOLVER.MOMENTUM' in the command line must be a finite number in \[0.0, 1.0\], got 3.0"),
        (["SOLVER.WARMUP_FACTOR", "0"], r"'SOLVER.WARMUP_FACTOR' in the command line must be a finite number in \(0.0, 1.0\], got 0"),
        (["SOLVER.MAX_STEPS", "-5"], r"'SOLVER.MAX_STEPS' in the command line must be an integer > 0 \(or null\), got -5"),
        # a float leaf without a declared range still refuses what no config means
        (["SOLVER.GAMMA", "-.inf"], r"'SOLVER.GAMMA' in the command line expects a finite number, got -inf"),
    ],
)
def test_values_out_of_range_name_the_key_and_the_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_ranged(), None, overrides)


def test_values_in_range_and_their_ends_are_accepted(tmp_path):
    cfg = load_config(_ranged(), None, ["SOLVER.BASE_LR", "0", "SOLVER.MOMENTUM", "1", "SOLVER.WARMUP_FACTOR", "1.0",
                                        "SOLVER.MAX_STEPS", "null", "SOLVER.EPOCHS", "1"])
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.MAX_STEPS, cfg.SOLVER.EPOCHS) == (0.0, 1.0, None, 1)
    assert isinstance(cfg.SOLVER.MOMENTUM, float)
    row = _write(tmp_path / "row.yaml", {"SOLVER": {"MOMENTUM": 1.5}})
    with pytest.raises(ConfigError, match=r"'SOLVER.MOMENTUM' in .*row.yaml must be a finite number in \[0.0, 1.0\], got 1.5"):
        load_config(_ranged(), row)


def test_a_range_whose_default_is_outside_it_is_a_programming_error():
    from mabn.engine.config import in_range, positive

    with pytest.raises(ValueError, match=r"default 0 is not an integer > 0"):
        positive(0)
    with pytest.raises(TypeError, match="in_range is for int and float leaves"):
        in_range("a", 0, 1)


def test_a_choice_that_yaml_reads_as_a_boolean_is_that_choice(tmp_path):
    """`SOLVER.AMP off` on the command line (and `AMP: off` in a file) is YAML's False: it means the choice 'off'.
    The boolean itself is what comes back, so YAML's other spellings of False mean 'off' too; True matches no choice."""
    for word in ("off", "false", "no"):
        assert load_config(_ranged(), None, ["SOLVER.AMP", "fp16", "SOLVER.AMP", word]).SOLVER.AMP == "off"
    row = tmp_path / "amp.yaml"
    row.write_text("SOLVER:\n  AMP: off\n")
    assert load_config(_ranged(), str(row)).SOLVER.AMP == "off"
    with pytest.raises(ConfigError, match=r"'SOLVER.AMP' in the command line: True is not one of \['off', 'bf16', 'fp16'\]"):
        load_config(_ranged(), None, ["SOLVER.AMP", "on"])


@pytest.mark.parametrize("trainer", ["cls", "det"])
@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("SOLVER.BASE_LR", "-0.1", "a finite number >= 0"),
        ("SOLVER.BASE_LR", "nan", "a finite number >= 0"),
        ("SOLVER.MOMENTUM", "3.0", r"a finite number in \[0.0, 1.0\]"),
        ("SOLVER.WEIGHT_DECAY", "-1e-4", "a finite number >= 0"),
        ("SOLVER.NORM_WEIGHT_DECAY", "-1", r"a finite number >= 0 \(or null\)"),
        ("SOLVER.REFERENCE_BATCH", "0", "an integer > 0"),
        ("DATA.WORKERS", "-1", "an integer >= 0"),
        ("TEST.MAX_IMAGES", "-1", "an integer >= 0"),
        ("DIST.TIMEOUT_MINUTES", "0", "a finite number > 0"),
        ("LOG.PERIOD", "0", "an integer > 0"),
    ],
)
def test_both_trainers_refuse_values_out_of_range(trainer, key, value, allowed):
    defaults = importlib.import_module(f"{trainer}.config").get_default_config()
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' in the command line must be {allowed}, got"):
        load_config(defaults, None, [key, value])
    assert load_config(defaults, None, ["SOLVER.AMP", "off"]).SOLVER.AMP == "off"


@pytest.mark.parametrize(
    "trainer,key,value,allowed",
    [
        ("cls", "SOLVER.EPOCHS", "0", "an integer > 0"),
        ("cls", "SOLVER.MAX_STEPS", "0", r"an integer > 0 \(or null\)"),
        ("cls", "DATA.BATCH_SIZE", "0", "an integer > 0"),
        ("cls", "TEST.BATCH_SIZE", "0", "an integer > 0"),
        ("cls", "TEST.EVAL_PERIOD", "0", "an integer > 0"),
        ("cls", "MODEL.NORM_BATCH_SIZE", "-2", r"an integer > 0 \(or null\)"),
        ("cls", "SOLVER.LABEL_SMOOTHING", "1.5", r"a finite number in \[0.0, 1.0\]"),
        ("cls", "SOLVER.WARMUP_FACTOR", "0", r"a finite number in \(0.0, 1.0\]"),
        ("det", "SOLVER.MAX_ITER", "0", "an integer > 0"),
        ("det", "SOLVER.IMS_PER_GPU", "0", "an integer > 0"),
        ("det", "TEST.IMS_PER_GPU", "0", "an integer > 0"),
        ("det", "MODEL.TRAINABLE_BACKBONE_LAYERS", "6", r"an integer in \[0, 5\]"),
        ("det", "MODEL.NUM_CLASSES", "1", r"an integer >= 2 \(or null\)"),
        ("det", "MODEL.RPN.NMS_THRESH", "1.5", r"a finite number in \[0.0, 1.0\]"),
        ("det", "MODEL.ROI_HEADS.DETECTIONS_PER_IMG", "0", "an integer > 0"),
    ],
)
def test_trainer_specific_ranges(trainer, key, value, allowed):
    defaults = importlib.import_module(f"{trainer}.config").get_default_config()
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' in the command line must be {allowed}, got"):
        load_config(defaults, None, [key, value])
