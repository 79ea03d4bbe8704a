"""Backbones and heads."""
from fastssl.models.backbones import BACKBONES, WidthResNet, build_backbone, export_backbone
from fastssl.models.branch import NormBranch
from fastssl.models.heads import MLP, DINOHead, Prototypes, prediction_mlp, projection_mlp

__all__ = ["BACKBONES", "WidthResNet", "build_backbone", "export_backbone", "MLP", "DINOHead",
           "Prototypes", "prediction_mlp", "projection_mlp", "NormBranch"]
