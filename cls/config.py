"""Defaults of the classification trainer: the authors' ImageNet recipe (ResNet-50, 120 epochs, 8 x 32).

Every YAML under ``configs/cls/`` only states what differs from these; every value can be overridden
on the command line (``SOLVER.BASE_LR 0.05``). See ``mabn/engine/config.py`` for the rules.
"""
from mabn.engine.config import CfgNode, one_of, optional
from mabn.layers.registry import NORMS

_C = CfgNode(
    {
        "OUTPUT_DIR": "runs/cls",
        "SEED": 0,
        "DEVICE": one_of("auto", "cpu", "cuda"),
        "MODEL": {
            "ARCH": one_of("resnet50", "resnet18", "resnet20"),
            "NUM_CLASSES": 1000,
            "IN_CHANNELS": 3,
            "NORM": one_of("bn", *[n for n in NORMS if n != "frozenbn"]),
            # b, the normalization batch; None = the whole per-GPU batch (bn, brn and mabn only)
            "NORM_BATCH_SIZE": optional(int),
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
            "BATCH_SIZE": 32,  # per process (GPU): the gradient batch N
            "WORKERS": 8,
            "SKIP_CORRUPT": False,
            # ImageNet input pipeline: the authors' release (square crops, BGR 0-255, no mean/std) or torchvision's
            # (RandomResizedCrop, RGB normalized by the ImageNet mean/std); see cls/transforms.py. Weights trained on
            # one input format (MODEL.WEIGHTS from torchvision: torchvision's) expect that pipeline.
            "PIPELINE": one_of("authors", "torchvision"),
            "CROP_SIZE": 224,
            "RESIZE_SIZE": 256,
            "LIGHTING_STD": 0.1,
            "PADDING": 4,  # small-image datasets: random-crop padding
            "SYNTHETIC_SAMPLES": 1024,
            "SYNTHETIC_IMAGE_SIZE": 224,
        },
        "SOLVER": {
            "EPOCHS": 120,
            "BASE_LR": 0.1,
            "REFERENCE_BATCH": 256,  # BASE_LR is the rate at this many images per step (linear scaling)
            "MOMENTUM": 0.9,
            "NESTEROV": False,
            "WEIGHT_DECAY": 1e-4,
            "NORM_WEIGHT_DECAY": optional(float),  # None: WEIGHT_DECAY on norm parameters too (the authors)
            "LR_SCHEDULE": one_of("step", "cosine"),
            "LR_STEPS": [30, 60, 90],  # epochs
            "LR_GAMMA": 0.1,
            "WARMUP_EPOCHS": 0.0,
            "WARMUP_FACTOR": 0.1,
            "LABEL_SMOOTHING": 0.1,
            "AMP": one_of("off", "bf16", "fp16"),
            "CHANNELS_LAST": False,
            # stop after this many steps (None: run all EPOCHS); for short runs and benchmarks
            "MAX_STEPS": optional(int),
        },
        "TEST": {
            "BATCH_SIZE": 50,
            "EVAL_PERIOD": 1,  # epochs
            "MAX_IMAGES": 0,  # evaluate this many validation images, spread evenly over the set (0: all)
        },
        "CHECKPOINT": {
            "PERIOD_STEPS": 0,  # also save every this many steps inside an epoch (0: at epoch ends only)
        },
        "DIST": {
            "BACKEND": one_of("auto", "nccl", "gloo"),
            "TIMEOUT_MINUTES": 30.0,
            # average BN/BRN/MABN inference statistics over ranks before evaluating and saving
            "AVERAGE_NORM_STATS": True,
        },
        "LOG": {
            "PERIOD": 20,  # steps between TensorBoard / text-log lines
            "PROGRESS": True,  # tqdm bar on rank 0
        },
        "STATS": {
            # record mu_B, sigma_B^2, g_B, Psi_B of norm layers (mabn.BatchStatisticsRecorder)
            "RECORD": False,
            "LAYERS": ["layer1.0.bn1"],
            "CHANNEL": 0,
            "PERIOD": 1,
        },
    }
)


def get_default_config() -> CfgNode:
    return _C.clone()
