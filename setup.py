"""The `mabn` layer library (torch and torchvision only); the trainers' dependencies are the `train` extra.

    pip install .              # MABN2d, CenConv2d, the baselines, convert_model, fold_model, ...
    pip install '.[train]'     # + what cls/train.py, det/train.py and scripts/ need (scripts/setup.sh)

The trainers themselves (cls/, det/) run from a checkout and are not installed as packages.
"""
from setuptools import find_packages, setup

setup(
    name="mabn",
    version="0.1.0",
    description="Moving Average Batch Normalization (ICLR 2020): layers, baselines and trainers",
    python_requires=">=3.10",
    packages=find_packages(include=["mabn", "mabn.*"]),
    # The range the layer tests pass on (README, "Installation"): oldest tested torch 2.9.1 / torchvision 0.24.1.
    # The project's own environment pins exact versions in constraints.txt (scripts/setup.sh).
    install_requires=[
        "torch>=2.9.1,<2.15",
        "torchvision>=0.24.1,<0.30",
    ],
    extras_require={
        "train": [
            "numpy",
            "pyyaml",
            "pycocotools",
            "tqdm",
            "tensorboard",
            # The paper's figures (statistics, error versus b) are drawn with it; pycocotools needs it anyway.
            "matplotlib",
        ],
        "test": ["pytest"],
    },
)
