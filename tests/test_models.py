"""Backbones and heads: shapes, torchvision compatibility of exported weights, head structure."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torchvision

from fastssl.models import MLP, DINOHead, Prototypes, build_backbone, export_backbone, projection_mlp
from loaders.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,width,feat", [("resnet18", 8, 64), ("resnet18", 16, 128), ("resnet50", 8, 256)])
def test_cifar_stem_shapes(name, width, feat):
    model, feat_dim = build_backbone(name, cifar_stem=True, width=width)
    assert feat_dim == feat
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, feat)
    # the CIFAR stem keeps 32x32 in stage 1; the last stage is 4x4
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert stem.shape[-2:] == (32, 32)
    assert model.layer4(model.layer3(model.layer2(model.layer1(stem)))).shape[-2:] == (4, 4)


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_exported_resnet18_loads_into_torchvision(cifar_stem):
    ours, _ = build_backbone("resnet18", cifar_stem=cifar_stem, width=64)
    with torch.no_grad():  # make BN statistics non-trivial
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = export_backbone(ours)
    assert all(t.device.type == "cpu" for t in state.values())
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    if cifar_stem:
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = nn.Identity()
    tv.load_state_dict(state, strict=True)
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv(x), ours(x))


def test_exported_resnet50_keys_match_torchvision():
    ours, feat = build_backbone("resnet50", cifar_stem=False, width=64)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(export_backbone(ours), strict=True)
    assert feat == 2048


def test_export_of_a_method_loads_into_fresh_backbone():
    from fastssl.methods import build_method
    backbone, feat = build_backbone("resnet18", width=8)
    method = build_method("simclr", backbone=backbone, feat_dim=feat, proj_hidden_dim=16, proj_output_dim=8)
    fresh, _ = build_backbone("resnet18", width=8)
    fresh.load_state_dict(export_backbone(method), strict=True)
    for a, b in zip(fresh.parameters(), method.backbone.parameters()):
        assert torch.equal(a, b)


def test_unknown_backbone_names_closest():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("resnet81")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_vit_small_tiny_images_and_export():
    model, feat = build_backbone("vit_small", img_size=16, patch_size=4, depth=1)
    assert feat == 384
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 384)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 384)  # multi-crop local views
    from timm.models.vision_transformer import VisionTransformer
    fresh = VisionTransformer(img_size=16, patch_size=4, embed_dim=384, depth=1, num_heads=6, num_classes=0)
    fresh.load_state_dict(export_backbone(model), strict=True)


def test_bcl_projector_structure():
    head = projection_mlp(512, 512, 128, hidden_bn=True, last_bn=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[3].bias is None and head.out_dim == 128
    assert head(torch.randn(4, 512)).shape == (4, 128)
    plain = MLP([8, 16, 4], hidden_bn=False)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[2].bias is not None


def test_dino_head_weight_norm():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_v.mul_(5)
    out = head(torch.randn(3, 16))
    assert out.shape == (3, 32)
    # g fixed at 1: rows are unit vectors, bottleneck features are unit vectors → |logits| <= 1
    assert out.abs().max() <= 1 + 1e-6
    assert not head.last_g.requires_grad


def test_prototypes_normalize():
    proto = Prototypes(4, 10)
    with torch.no_grad():
        proto.layer.weight.mul_(3)
    proto.normalize()
    torch.testing.assert_close(proto.layer.weight.norm(dim=1), torch.ones(10))


def test_heads_pass_gradients_to_their_last_layer():
    """Freezing (DINO's last layer, SwAV's prototypes) is the method's ``on_after_backward``:
    the heads' forward always uses and differentiates every parameter."""
    from fastssl.models import heads
    assert not hasattr(heads, "freeze_grad")
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    last = head.last_layer_parameters()
    assert [id(p) for p in last] == [id(head.last_v), id(head.last_g)]
    head(torch.randn(3, 16)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last)
    proto = Prototypes(4, 10)
    proto(torch.randn(3, 4)).pow(2).sum().backward()
    assert proto.layer.weight.grad.abs().sum() > 0
