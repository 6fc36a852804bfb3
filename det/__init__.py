"""COCO Mask R-CNN R50-FPN trainer on torchvision detection models (launched with torchrun: det/train.py)."""
