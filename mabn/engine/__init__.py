"""What the two trainers (``cls/train.py``, ``det/train.py``) share, apart from the layer library: the config tree,
checkpoints, process groups, the command line, logging, the solver and resumable sampling.

Needs the ``train`` extra (``pip install '.[train]'``: pyyaml, numpy, tqdm, tensorboard); ``import mabn`` does
not import it.
"""
