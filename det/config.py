"""Defaults of the detection trainer: the paper's COCO recipe (Mask R-CNN R50-FPN, 2x schedule, 8 x 2 images).

Every YAML under ``configs/det/`` only states what differs from these; every value can be overridden
on the command line (``SOLVER.BASE_LR 0.01``). See ``mabn/engine/config.py`` for the rules.
"""
from det.input_format import INPUT_FORMATS
from mabn.engine.config import CfgNode, in_range, non_negative, one_of, optional, positive
from mabn.layers.registry import NORMS

_C = CfgNode(
    {
        "OUTPUT_DIR": "runs/det",
        "SEED": 0,
        "DEVICE": one_of("auto", "cpu", "cuda"),
        "MODEL": {
            # norm of the ResNet body (det.model.build_mask_rcnn); frozenbn needs BACKBONE_WEIGHTS
            "NORM": one_of("bn", *NORMS),
            # keyword options of the body norm (mabn.build_norm), e.g. {buffer_size: 16}
            "NORM_OPTIONS": CfgNode({}, new_allowed=True),
            # norm of the FPN and the RoI heads: a norm name or 'none' (None: NORM, or 'none' for frozenbn)
            "HEAD_NORM": optional(str),
            # keyword options of the head norm: when it is the body's norm, NORM_OPTIONS updated with these; when it
            # is another norm, these alone (an option name can mean different things to two norms, e.g. momentum)
            "HEAD_NORM_OPTIONS": CfgNode({}, new_allowed=True),
            # weight-centered convs (mabn.CenConv2d) in body, FPN and heads (None: exactly for mabn)
            "CENTERED_CONVS": optional(bool),
            # body stages trained, counted from layer4: 5 trains everything (from scratch), 3 freezes stem + layer1
            "TRAINABLE_BACKBONE_LAYERS": in_range(5, 0, 5),
            # ImageNet ResNet-50 for the body (fine-tuning): a torchvision state_dict or a cls/train.py checkpoint
            "BACKBONE_WEIGHTS": "",
            # weights of the whole detector, a checkpoint of this trainer or a torchvision Mask R-CNN state_dict: training
            # starts from it (any norm, translated; the parts that do not fit stay new, said in the log), --test-only
            # evaluates it (exactly)
            "WEIGHTS": "",
            # classes including the background (None: from the training annotations)
            "NUM_CLASSES": in_range(None, 2, kind=int),
            "RESNETS": {
                # stride of each stage's first bottleneck on its 1x1 conv (MSRA, the authors) or on the 3x3
                # (torchvision); ImageNet weights (BACKBONE_WEIGHTS) must come from the same layout
                "STRIDE_IN_1X1": False,
            },
            # initialization of the box and mask heads: torchvision's, or the authors' (maskrcnn-benchmark: box head
            # convs N(0, 0.01), box predictor cls N(0, 0.01) / bbox N(0, 0.001), biases 0); see det/model.py
            "HEAD_INIT": one_of("torchvision", "authors"),
            # the network input made from the RGB [0, 1] images: torchvision's (normalized by the ImageNet mean / std)
            # or the authors' (BGR 0-255 minus maskrcnn-benchmark's pixel mean, std 1); see det/input_format.py
            "INPUT_FORMAT": one_of(*INPUT_FORMATS),
            "MIN_SIZE": positive(800),  # short side of the resized images
            "MAX_SIZE": positive(1333),  # cap on the long side
            "RPN": {  # torchvision's defaults (numbers of proposals are per image; PRE_NMS per FPN level)
                "PRE_NMS_TOP_N_TRAIN": positive(2000),
                "PRE_NMS_TOP_N_TEST": positive(1000),
                "POST_NMS_TOP_N_TRAIN": positive(2000),
                "POST_NMS_TOP_N_TEST": positive(1000),
                "NMS_THRESH": in_range(0.7, 0.0, 1.0),
                "FG_IOU_THRESH": in_range(0.7, 0.0, 1.0),
                "BG_IOU_THRESH": in_range(0.3, 0.0, 1.0),
                "BATCH_SIZE_PER_IMAGE": positive(256),  # anchors sampled per image for the RPN losses
                "POSITIVE_FRACTION": in_range(0.5, 0.0, 1.0),
                "SMOOTH_L1_BETA": positive(1.0 / 9),  # of the RPN box loss (torchvision and the authors)
                # POST_NMS_TOP_N_TRAIN counted over the whole batch in training (the authors), not per image
                "POST_NMS_PER_BATCH": False,
                # anchors reaching more than this many pixels outside the image are ignored by the RPN loss
                # (the authors: 0); negative keeps them all (torchvision)
                "STRADDLE_THRESH": -1.0,
            },
            "ROI_HEADS": {  # Detectron's: 512 RoIs per image, a quarter of them foreground
                "BATCH_SIZE_PER_IMAGE": positive(512),
                "POSITIVE_FRACTION": in_range(0.25, 0.0, 1.0),
                "FG_IOU_THRESH": in_range(0.5, 0.0, 1.0),
                "BG_IOU_THRESH": in_range(0.5, 0.0, 1.0),
                "SCORE_THRESH_TEST": in_range(0.05, 0.0, 1.0),
                "NMS_THRESH_TEST": in_range(0.5, 0.0, 1.0),
                "DETECTIONS_PER_IMG": positive(100),
                "SMOOTH_L1_BETA": positive(1.0 / 9),  # of the box head's box loss (torchvision; the authors: 1)
            },
        },
        "DATA": {
            # COCO layout under ROOT; relative paths below are taken from ROOT, absolute ones as they are.
            # The 2014 split (trainval35k / minival) holds the same images as train2017 / val2017; with the
            # 2014 files: TRAIN_IMAGES [train2014, val2014], TRAIN_ANNOTATIONS [annotations/instances_train2014.json,
            # annotations/instances_valminusminival2014.json], VAL_IMAGES val2014, VAL_ANNOTATIONS
            # annotations/instances_minival2014.json.
            "ROOT": "datasets/coco",
            # one or more training sets, concatenated (image directories and annotation files pair up)
            "TRAIN_IMAGES": ["train2017"],
            "TRAIN_ANNOTATIONS": ["annotations/instances_train2017.json"],
            "VAL_IMAGES": "val2017",
            "VAL_ANNOTATIONS": "annotations/instances_val2017.json",
            "WORKERS": non_negative(4),  # loader processes per GPU
        },
        "SOLVER": {
            # The paper's 2x schedule: 180k iterations of 16 images, lr / 10 at 120k and 160k.
            "MAX_ITER": positive(180000),
            "STEPS": [120000, 160000],
            "GAMMA": positive(0.1),
            "IMS_PER_GPU": positive(2),  # images per process: the gradient (and, for bn / brn / mabn, normalization) batch
            "BASE_LR": non_negative(0.02),
            "REFERENCE_BATCH": positive(16),  # BASE_LR is the rate at this many images per iteration (linear scaling)
            "MOMENTUM": in_range(0.9, 0.0, 1.0),
            "WEIGHT_DECAY": non_negative(1e-4),
            "NORM_WEIGHT_DECAY": non_negative(None, kind=float),  # None: WEIGHT_DECAY on norm parameters too
            # every parameter named `bias` (norm betas included) trains at BASE_LR x BIAS_LR_FACTOR with weight
            # decay WEIGHT_DECAY_BIAS (None: the decay it would have otherwise); the authors: 2 and 0
            "BIAS_LR_FACTOR": positive(1.0),
            "WEIGHT_DECAY_BIAS": non_negative(None, kind=float),
            "WARMUP_ITERS": non_negative(500),
            "WARMUP_FACTOR": in_range(1.0 / 3, 0.0, 1.0, low_open=True),  # the warm-up ramps the rate linearly from this fraction
            "AMP": one_of("off", "bf16", "fp16"),
        },
        "TEST": {
            "IMS_PER_GPU": positive(1),
            "EVAL_PERIOD": non_negative(0),  # iterations between evaluations (0: only at the end)
            "MAX_IMAGES": non_negative(0),  # evaluate this many validation images, spread evenly over the set (0: all)
        },
        "CHECKPOINT": {
            "PERIOD": non_negative(5000),  # iterations between checkpoints (OUTPUT_DIR/checkpoint.pth, overwritten); 0: at the end only
            # resume although a key that changes what the checkpoint means (the trainer's RESUME_MUST_MATCH) or the
            # number of processes differs from the run that saved it; without it such a resume is refused, naming the keys
            "RESUME_CHANGED_CONFIG": False,
        },
        "DIST": {
            "BACKEND": one_of("auto", "nccl", "gloo"),
            "TIMEOUT_MINUTES": positive(30.0),
            # average BN/BRN/MABN inference statistics over ranks before evaluating and saving
            "AVERAGE_NORM_STATS": True,
            # DDP's search for parameters without gradient; every parameter gets one in Mask R-CNN training
            "FIND_UNUSED_PARAMETERS": False,
        },
        "LOG": {
            "PERIOD": positive(20),  # iterations between TensorBoard / text-log lines
            "PROGRESS": True,  # tqdm bar on rank 0
        },
    }
)


def get_default_config() -> CfgNode:
    return _C.clone()
