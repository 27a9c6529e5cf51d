"""Tests for ds_spngd_lab.models: output shapes, parameter counts, zero-gamma init, K-FAC-friendly sizes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_spngd_lab.models import MODEL_NAMES, build_model
from ds_spngd_lab.models.resnet import BasicBlock, Bottleneck, resnet18


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(name: str, expected: int) -> None:
    assert _count(build_model(name, num_classes=1000, in_channels=3)) == expected


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_zero_gamma_and_shapes(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=1)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for block in blocks:
        assert torch.count_nonzero(block.last_bn().weight) == 0
        assert torch.all(block.bn1.weight == 1)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_resnet_block_starts_as_identity_branch() -> None:
    block = resnet18(num_classes=10).layer1[0]
    block.eval()
    x = torch.rand(2, 64, 8, 8)  # non-negative, so relu(x + 0) == x
    with torch.no_grad():
        assert torch.allclose(block(x), x)


def test_mnist_models_output_logits() -> None:
    x = torch.randn(5, 1, 28, 28)
    for name in ("mlp", "cnn", "cnn4"):
        out = build_model(name, num_classes=10, in_channels=1)(x)
        assert out.shape == (5, 10) and out.dtype == torch.float32


@pytest.mark.parametrize(("name", "expected"), [("cnn", [9, 288, 576, 129]), ("cnn4", [9, 288, 576, 576, 129])])
def test_cnn_kfac_input_dimensions_stay_small(name: str, expected: list[int]) -> None:
    model = build_model(name, 10, 1)
    dims = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            dims.append(m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (m.bias is not None))
        elif isinstance(m, nn.Linear):
            dims.append(m.in_features + 1)
    assert dims == expected
    assert max(dims) <= 600
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(expected) - 1


def test_mlp_structure_and_input_check() -> None:
    model = build_model("mlp", 10, 1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 512), (512, 10)]
    with pytest.raises(ValueError, match="expects 784 features"):
        model(torch.randn(2, 1, 20, 20))
    assert build_model("mlp", 3, 3, image_size=8)(torch.randn(4, 3, 8, 8)).shape == (4, 3)


def test_models_train_one_step() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for name in ("mlp", "cnn"):
        model = build_model(name, 10, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = nn.functional.cross_entropy(model(x), y)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert nn.functional.cross_entropy(model(x), y) < before


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="valid names: mlp, cnn, cnn4, resnet18, resnet50"):
        build_model("vgg", 10, 1)
    with pytest.raises(ValueError, match="positive"):
        build_model("cnn", 0, 1)
    assert set(MODEL_NAMES) == {"mlp", "cnn", "cnn4", "resnet18", "resnet50"}
    assert isinstance(build_model("CNN", 10, 1), nn.Module)
