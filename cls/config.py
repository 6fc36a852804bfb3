"""Defaults of the classification trainer: the authors' ImageNet recipe (ResNet-50, 120 epochs, 8 x 32).

Every YAML under ``configs/cls/`` only states what differs from these; every value can be overridden
on the command line (``SOLVER.BASE_LR 0.05``). See ``mabn/engine/config.py`` for the rules.
"""
from mabn.engine.config import CfgNode, in_range, non_negative, one_of, positive
from mabn.layers.registry import NORMS

_C = CfgNode(
    {
        "OUTPUT_DIR": "runs/cls",
        "SEED": 0,
        "DEVICE": one_of("auto", "cpu", "cuda"),
        "MODEL": {
            "ARCH": one_of("resnet50", "resnet18", "resnet20"),
            "NUM_CLASSES": positive(1000),
            "IN_CHANNELS": positive(3),
            "NORM": one_of("bn", *[n for n in NORMS if n != "frozenbn"]),
            # b, the normalization batch; None = the whole per-GPU batch (bn, brn and mabn only)
            "NORM_BATCH_SIZE": positive(None, kind=int),
            # keyword options of the norm layer (mabn.build_norm), e.g. {buffer_size: 16, warmup_iters: 100}
            "NORM_OPTIONS": CfgNode({}, new_allowed=True),
            "CENTERED_CONVS": False,
            "ZERO_INIT_RESIDUAL": False,
            # weights to start from, a checkpoint of this trainer or a torchvision state_dict: any norm (BN statistics are
            # translated to MABN's) and any number of classes (the classifier then stays new); --test-only evaluates it
            "WEIGHTS": "",
        },
        "DATA": {
            "DATASET": one_of("imagenet", "fashion_mnist", "synthetic"),
            "ROOT": "",
            "TRAIN_SPLIT": "train",
            "VAL_SPLIT": "val",
            "BATCH_SIZE": positive(32),  # per process (GPU): the gradient batch N
            "WORKERS": non_negative(8),
            "SKIP_CORRUPT": False,
            # ImageNet input pipeline: torchvision's (RandomResizedCrop, RGB normalized by the ImageNet mean/std; the
            # default, what torchvision's weights expect) or the authors' release (square crops, BGR 0-255, no
            # mean/std; the paper rows, configs/cls/base.yaml); see cls/transforms.py. Weights trained on one input
            # format (MODEL.WEIGHTS) expect that pipeline.
            "PIPELINE": one_of("torchvision", "authors"),
            "CROP_SIZE": positive(224),
            "RESIZE_SIZE": positive(256),
            "LIGHTING_STD": non_negative(0.1),
            "PADDING": non_negative(4),  # small-image datasets: random-crop padding
            "SYNTHETIC_SAMPLES": positive(1024),
            "SYNTHETIC_IMAGE_SIZE": positive(224),
        },
        "SOLVER": {
            "EPOCHS": positive(120),
            "BASE_LR": non_negative(0.1),
            "REFERENCE_BATCH": positive(256),  # BASE_LR is the rate at this many images per step (linear scaling)
            "MOMENTUM": in_range(0.9, 0.0, 1.0),
            "NESTEROV": False,
            "WEIGHT_DECAY": non_negative(1e-4),
            "NORM_WEIGHT_DECAY": non_negative(None, kind=float),  # None: WEIGHT_DECAY on norm parameters too (the authors)
            "LR_SCHEDULE": one_of("step", "cosine"),
            "LR_STEPS": [30, 60, 90],  # epochs
            "LR_GAMMA": positive(0.1),
            "WARMUP_EPOCHS": non_negative(0.0),
            "WARMUP_FACTOR": in_range(0.1, 0.0, 1.0, low_open=True),
            "LABEL_SMOOTHING": in_range(0.1, 0.0, 1.0),
            "AMP": one_of("off", "bf16", "fp16"),
            "CHANNELS_LAST": False,
            # stop after this many steps (None: run all EPOCHS); for short runs and benchmarks
            "MAX_STEPS": positive(None, kind=int),
        },
        "TEST": {
            "BATCH_SIZE": positive(50),
            "EVAL_PERIOD": positive(1),  # epochs
            "MAX_IMAGES": non_negative(0),  # evaluate this many validation images, spread evenly over the set (0: all)
        },
        "CHECKPOINT": {
            "PERIOD_STEPS": non_negative(0),  # also save every this many steps inside an epoch (0: at epoch ends only)
            # resume although a key that changes what the checkpoint means (the trainer's RESUME_MUST_MATCH) or the
            # number of processes differs from the run that saved it; without it such a resume is refused, naming the keys
            "RESUME_CHANGED_CONFIG": False,
        },
        "DIST": {
            "BACKEND": one_of("auto", "nccl", "gloo"),
            "TIMEOUT_MINUTES": positive(30.0),
            # average BN/BRN/MABN inference statistics over ranks before evaluating and saving
            "AVERAGE_NORM_STATS": True,
        },
        "LOG": {
            "PERIOD": positive(20),  # steps between TensorBoard / text-log lines
            "PROGRESS": True,  # tqdm bar on rank 0
        },
        "STATS": {
            # record mu_B, sigma_B^2, g_B, Psi_B of norm layers (mabn.BatchStatisticsRecorder)
            "RECORD": False,
            "LAYERS": ["layer1.0.bn1"],
            "CHANNEL": non_negative(0),
            "PERIOD": positive(1),
        },
    }
)


def get_default_config() -> CfgNode:
    return _C.clone()
