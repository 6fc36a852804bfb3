"""Defaults of the detection trainer: the paper's COCO recipe (Mask R-CNN R50-FPN, 2x schedule, 8 x 2 images).

Every YAML under ``configs/det/`` only states what differs from these; every value can be overridden
on the command line (``SOLVER.BASE_LR 0.01``). See ``mabn/engine/config.py`` for the rules.
"""
from mabn.engine.config import CfgNode, one_of, optional
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
            "TRAINABLE_BACKBONE_LAYERS": 5,
            # ImageNet ResNet-50 for the body (fine-tuning): a torchvision state_dict or a cls/train.py checkpoint
            "BACKBONE_WEIGHTS": "",
            # weights of the whole detector, a checkpoint of this trainer or a torchvision Mask R-CNN state_dict: training
            # starts from it (any norm, translated; the parts that do not fit stay new, said in the log), --test-only
            # evaluates it (exactly)
            "WEIGHTS": "",
            # classes including the background (None: from the training annotations)
            "NUM_CLASSES": optional(int),
            "RESNETS": {
                # stride of each stage's first bottleneck on its 1x1 conv (MSRA, the authors) or on the 3x3
                # (torchvision); ImageNet weights (BACKBONE_WEIGHTS) must come from the same layout
                "STRIDE_IN_1X1": False,
            },
            # initialization of the box and mask heads: torchvision's, or the authors' (maskrcnn-benchmark: box head
            # convs N(0, 0.01), box predictor cls N(0, 0.01) / bbox N(0, 0.001), biases 0); see det/model.py
            "HEAD_INIT": one_of("torchvision", "authors"),
            "MIN_SIZE": 800,  # short side of the resized images
            "MAX_SIZE": 1333,  # cap on the long side
            "RPN": {  # torchvision's defaults (numbers of proposals are per image; PRE_NMS per FPN level)
                "PRE_NMS_TOP_N_TRAIN": 2000,
                "PRE_NMS_TOP_N_TEST": 1000,
                "POST_NMS_TOP_N_TRAIN": 2000,
                "POST_NMS_TOP_N_TEST": 1000,
                "NMS_THRESH": 0.7,
                "FG_IOU_THRESH": 0.7,
                "BG_IOU_THRESH": 0.3,
                "BATCH_SIZE_PER_IMAGE": 256,  # anchors sampled per image for the RPN losses
                "POSITIVE_FRACTION": 0.5,
                "SMOOTH_L1_BETA": 1.0 / 9,  # of the RPN box loss (torchvision and the authors)
                # POST_NMS_TOP_N_TRAIN counted over the whole batch in training (the authors), not per image
                "POST_NMS_PER_BATCH": False,
                # anchors reaching more than this many pixels outside the image are ignored by the RPN loss
                # (the authors: 0); negative keeps them all (torchvision)
                "STRADDLE_THRESH": -1.0,
            },
            "ROI_HEADS": {  # Detectron's: 512 RoIs per image, a quarter of them foreground
                "BATCH_SIZE_PER_IMAGE": 512,
                "POSITIVE_FRACTION": 0.25,
                "FG_IOU_THRESH": 0.5,
                "BG_IOU_THRESH": 0.5,
                "SCORE_THRESH_TEST": 0.05,
                "NMS_THRESH_TEST": 0.5,
                "DETECTIONS_PER_IMG": 100,
                "SMOOTH_L1_BETA": 1.0 / 9,  # of the box head's box loss (torchvision; the authors: 1)
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
            "WORKERS": 4,  # loader processes per GPU
        },
        "SOLVER": {
            # The paper's 2x schedule: 180k iterations of 16 images, lr / 10 at 120k and 160k.
            "MAX_ITER": 180000,
            "STEPS": [120000, 160000],
            "GAMMA": 0.1,
            "IMS_PER_GPU": 2,  # images per process: the gradient (and, for bn / brn / mabn, normalization) batch
            "BASE_LR": 0.02,
            "REFERENCE_BATCH": 16,  # BASE_LR is the rate at this many images per iteration (linear scaling)
            "MOMENTUM": 0.9,
            "WEIGHT_DECAY": 1e-4,
            "NORM_WEIGHT_DECAY": optional(float),  # None: WEIGHT_DECAY on norm parameters too
            # every parameter named `bias` (norm betas included) trains at BASE_LR x BIAS_LR_FACTOR with weight
            # decay WEIGHT_DECAY_BIAS (None: the decay it would have otherwise); the authors: 2 and 0
            "BIAS_LR_FACTOR": 1.0,
            "WEIGHT_DECAY_BIAS": optional(float),
            "WARMUP_ITERS": 500,
            "WARMUP_FACTOR": 1.0 / 3,  # the warm-up ramps the rate linearly from this fraction
            "AMP": one_of("off", "bf16", "fp16"),
        },
        "TEST": {
            "IMS_PER_GPU": 1,
            "EVAL_PERIOD": 0,  # iterations between evaluations (0: only at the end)
            "MAX_IMAGES": 0,  # evaluate this many validation images, spread evenly over the set (0: all)
        },
        "CHECKPOINT": {
            "PERIOD": 5000,  # iterations between checkpoints (OUTPUT_DIR/checkpoint.pth, overwritten); 0: at the end only
        },
        "DIST": {
            "BACKEND": one_of("auto", "nccl", "gloo"),
            "TIMEOUT_MINUTES": 30.0,
            # average BN/BRN/MABN inference statistics over ranks before evaluating and saving
            "AVERAGE_NORM_STATS": True,
            # DDP's search for parameters without gradient; every parameter gets one in Mask R-CNN training
            "FIND_UNUSED_PARAMETERS": False,
        },
        "LOG": {
            "PERIOD": 20,  # iterations between TensorBoard / text-log lines
            "PROGRESS": True,  # tqdm bar on rank 0
        },
    }
)


def get_default_config() -> CfgNode:
    return _C.clone()
