"""ImageNet / Fashion-MNIST classification trainer (launched with torchrun: cls/train.py)."""
