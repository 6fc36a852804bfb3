"""Classification backbones with the norm chosen by name and weight-centered convs on or off.

``resnet50`` and ``resnet18`` are torchvision's own classes (same architecture and ``state_dict``
keys, so torchvision weights load into the BN model); ``resnet20`` is the CIFAR-style network of
He et al. (3 stages of 16/32/64 channels) for 28-32 px inputs, built from torchvision's BasicBlock.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from mabn import build_norm, convert_model


def _norm_layer(norm: str, options: Optional[dict]):
    return functools.partial(build_norm, norm, **(options or {}))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem, stages of 16/32/64 channels, global pooling, fc."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._stage(16, blocks, 1, norm_layer)
        self.layer2 = self._stage(32, blocks, 2, norm_layer)
        self.layer3 = self._stage(64, blocks, 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), norm_layer(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHITECTURES = ("resnet50", "resnet18", "resnet20")


def build_classifier(
    arch: str = "resnet50",
    num_classes: int = 1000,
    norm: str = "bn",
    norm_options: Optional[dict] = None,
    centered_convs: bool = False,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A classifier whose every norm is ``build_norm(norm, C, **norm_options)`` and, with
    ``centered_convs``, every conv that feeds a norm a :class:`~mabn.CenConv2d`."""
    norm_layer = _norm_layer(norm, norm_options)
    if arch in ("resnet50", "resnet18"):
        model = getattr(torchvision.models, arch)(num_classes=num_classes, norm_layer=norm_layer, zero_init_residual=zero_init_residual)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    elif arch == "resnet20":
        model = CifarResNet(20, num_classes, in_channels, norm_layer)
    else:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if centered_convs:
        convert_model(model, conv="cen")
    return model
