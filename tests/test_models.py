"""Contract and reference tests for the backbones in ``oodgate.learning.models``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from oodgate.learning import models
from oodgate.learning.models import BACKBONES, create_backbone

# Parameter counts of the backbone alone. The published figures include a 10-class linear layer
# (D * 10 + 10 parameters): ResNet-18 11.17M, ResNet-34 21.28M, DenseNet-BC-100 (k=12) 0.77M,
# WRN-28-10 36.5M, WRN-40-2 2.24M.
PUBLISHED_WITH_FC = {
    "resnet18": (11.17e6, 512),
    "resnet34": (21.28e6, 512),
    "densenet_bc_100": (0.769e6, 342),
    "wrn_28_10": (36.48e6, 640),
    "wrn_40_2": (2.24e6, 128),
}
REPO = Path(__file__).resolve().parents[1]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def cifar_nets() -> dict[str, torch.nn.Module]:
    """Each backbone built once for 3x32x32 input (the big ones take a second or two to init)."""
    torch.manual_seed(0)
    return {name: create_backbone(name, in_channels=3, image_size=32) for name in BACKBONES}


def test_registry_lists_exactly_the_backbones_the_docs_document() -> None:
    readme = (REPO / "docs" / "configuration.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("- `model`: the backbone"))
    line += next(x for x in readme.splitlines()[readme.splitlines().index(line) + 1 :])
    documented = set(re.findall(r"`([a-z0-9_]+)`", line)) - {"model"}
    assert set(models.names()) == documented


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_output_shape_is_batch_by_out_features(name: str, cifar_nets: dict[str, torch.nn.Module]) -> None:
    net = cifar_nets[name].eval()
    if name in PUBLISHED_WITH_FC:  # the feature width of the published architecture
        assert net.out_features == PUBLISHED_WITH_FC[name][1]
    with torch.inference_mode():
        f = net(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, net.out_features)
    assert f.dtype == torch.float32 and torch.isfinite(f).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED_WITH_FC))
def test_parameter_count_matches_published_figure(name: str, cifar_nets: dict[str, torch.nn.Module]) -> None:
    published, dim = PUBLISHED_WITH_FC[name]
    expected = published - (dim * 10 + 10)
    assert n_params(cifar_nets[name]) == pytest.approx(expected, rel=0.01)


def test_exact_parameter_counts(cifar_nets: dict[str, torch.nn.Module]) -> None:
    # Computed by hand from the architectures' definitions; pins the exact layer layout.
    exact = {
        "resnet18": 11_168_832,
        "resnet34": 21_276_992,
        "densenet_bc_100": 765_732,
        "wrn_28_10": 36_472_784,
        "wrn_40_2": 2_242_256,
    }
    assert {name: n_params(cifar_nets[name]) for name in exact} == exact


def test_small_cnn_on_grayscale_28() -> None:
    net = create_backbone("small_cnn", in_channels=1, image_size=28)
    # conv weights 1*32*9 + 32*64*9 + 64*128*9, BN weight and bias 2*(32 + 64 + 128)
    assert n_params(net) == 288 + 18_432 + 73_728 + 448
    f = net(torch.randn(2, 1, 28, 28))
    assert f.shape == (2, 128)
    f.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("size", [8, 13, 64])
def test_small_cnn_accepts_any_size_from_8(size: int) -> None:
    net = create_backbone("small_cnn", in_channels=2, image_size=size).eval()
    assert net(torch.randn(2, 2, size, size)).shape == (2, 128)


def test_small_cnn_width_option_sets_out_features() -> None:
    net = create_backbone("small_cnn", in_channels=1, image_size=28, width=8)
    assert net.out_features == 32
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_cifar_backbone_on_single_channel_input() -> None:
    net = create_backbone("resnet18", in_channels=1, image_size=12).eval()
    with torch.inference_mode():
        assert net(torch.randn(2, 1, 12, 12)).shape == (2, 512)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "densenet_bc_100", "wrn_40_2"])
def test_channels_last_input_gives_the_same_features(name: str) -> None:
    torch.manual_seed(0)
    net = create_backbone(name, in_channels=3, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = net(x)
        net = net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last))
    # Features grow through ~100 untrained layers; the two layouts sum in different orders.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_init_is_deterministic_under_manual_seed() -> None:
    for name in ("small_cnn", "wrn_40_2"):
        torch.manual_seed(123)
        a = create_backbone(name, in_channels=3, image_size=32).state_dict()
        torch.manual_seed(123)
        b = create_backbone(name, in_channels=3, image_size=32).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    torch.manual_seed(124)
    c = create_backbone("wrn_40_2", in_channels=3, image_size=32).state_dict()
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_standard_init() -> None:
    torch.manual_seed(0)
    net = create_backbone("resnet18", in_channels=3, image_size=32)
    bn = net.stem[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * 3 * 3)).
    w = net.layer4[0].conv1.weight
    assert w.std().item() == pytest.approx((2.0 / (512 * 9)) ** 0.5, rel=0.02)
    assert abs(w.mean().item()) < 1e-3


@pytest.mark.parametrize("name", ["wrn_40_2", "wrn_28_10", "small_cnn", "resnet34"])
def test_the_listed_defaults_are_what_a_build_without_options_uses(name) -> None:
    """``backbone_options`` (what params.yaml may set, with its defaults) describes the build: the same
    weights whether its defaults are passed or left out."""
    defaults = models.backbone_options(name)
    torch.manual_seed(0)
    plain = create_backbone(name, in_channels=3, image_size=32)
    torch.manual_seed(0)
    explicit = create_backbone(name, in_channels=3, image_size=32, **defaults)
    assert plain.out_features == explicit.out_features
    for (k, a), (_, b) in zip(plain.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), k
    if "dropout" in defaults:
        rates = {m.dropout for m in plain.modules() if hasattr(m, "dropout")}
        assert rates == {defaults["dropout"]}


def test_wrn_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    net = create_backbone("wrn_40_2", in_channels=3, image_size=8, dropout=0.5)
    x = torch.randn(2, 3, 8, 8)
    net.train()
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, net(x))
    net.eval()
    with torch.inference_mode():
        torch.testing.assert_close(net(x), net(x))


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'; valid backbones: densenet_bc_100, "):
        create_backbone("resnet50", in_channels=3, image_size=32)


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) 'depth' for backbone 'wrn_40_2'; valid options: dropout"
    ):
        create_backbone("wrn_40_2", in_channels=3, image_size=32, depth=16)
    with pytest.raises(ValueError, match=r"'widht' for backbone 'small_cnn'; valid options: width"):
        create_backbone("small_cnn", in_channels=1, image_size=28, widht=16)
    with pytest.raises(ValueError, match=r"'dropout' for backbone 'resnet18'; valid options: none"):
        models.check_options("resnet18", {"dropout": 0.1})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("small_cnn", {"width": 0}, r"option 'width' must be a positive integer, got 0"),
        ("small_cnn", {"width": 1.5}, r"option 'width' must be a positive integer, got 1.5"),
        ("wrn_40_2", {"dropout": 1.0}, r"option 'dropout' must be a number in \[0, 1\), got 1.0"),
        (
            "densenet_bc_100",
            {"dropout": "high"},
            r"option 'dropout' must be a number in \[0, 1\), got 'high'",
        ),
    ],
)
def test_invalid_option_value_names_the_option(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_backbone(name, in_channels=3, image_size=32, **options)


def test_invalid_input_geometry() -> None:
    with pytest.raises(ValueError, match=r"image_size must be an integer >= 8, got 4"):
        create_backbone("small_cnn", in_channels=1, image_size=4)
    with pytest.raises(ValueError, match=r"in_channels must be a positive integer, got 0"):
        create_backbone("small_cnn", in_channels=0, image_size=28)
