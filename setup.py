"""Installable package for the MABN reproduction: the `mabn` core and the `cls` / `det` trainers."""
from setuptools import find_packages, setup

setup(
    name="mabn",
    version="0.1.0",
    description="Moving Average Batch Normalization (ICLR 2020): layers, baselines and trainers",
    python_requires=">=3.10",
    packages=find_packages(include=["mabn", "mabn.*", "cls", "cls.*", "det", "det.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "pyyaml",
        "pycocotools",
        "tqdm",
        "tensorboard",
        # The paper's figures (statistics, error versus b) are drawn with it; pycocotools needs it anyway.
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
)
