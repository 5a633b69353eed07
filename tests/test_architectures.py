"""The SE-ResNet family: shapes, parameter counts and MACs against the published figures,
and timm-compatible state dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.architectures import (
    ARCHITECTURES,
    UnknownArchitectureError,
    count_macs,
    count_parameters,
    create_model,
)
from export.checkpoint import CheckpointError, load_into, read_state_dict

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("arch", "params"),
    [
        ("seresnet50", 28_088_024),  # timm / Hu et al. Table 2 (28.09M)
        ("resnet50", 25_557_032),  # torchvision / He et al.
        ("seresnet18", 11_779_624),
        ("seresnext50_32x4d", 27_559_896),  # timm
        ("seresnet14_cifar", 178_826),
    ],
)
def test_parameter_counts(arch: str, params: int) -> None:
    assert count_parameters(create_model(arch)) == params


def test_seresnet50_macs_match_the_paper() -> None:
    macs = count_macs(create_model("seresnet50"), (3, 224, 224))
    assert abs(macs / 1e9 - 4.09) < 0.01  # Hu et al. Table 2: 3.87 GFLOPs ResNet-50 +0.26%
    base = count_macs(create_model("resnet50"), (3, 224, 224))
    assert 0 < (macs - base) / base < 0.01  # SE adds well under 1 % compute


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_output_shapes(arch: str) -> None:
    spec = ARCHITECTURES[arch]
    size = min(spec.defaults["img_size"], 64)
    model = create_model(arch, num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(2, spec.defaults["in_chans"], size, size))
    assert out.shape == (2, 7)


def test_se_sits_before_the_residual_add() -> None:
    model = create_model("seresnet50", init="random")
    block = model.layer1[0]
    seen: list[str] = []
    block.se.register_forward_hook(lambda *_: seen.append("se"))
    block.act3.register_forward_hook(lambda *_: seen.append("act3"))
    block.downsample.register_forward_hook(lambda *_: seen.append("shortcut"))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen[:3] == ["shortcut", "se", "act3"]


TIMM_KEYS = [  # names as timm's seresnet50 state dict has them
    "conv1.weight",
    "bn1.running_var",
    "layer1.0.conv3.weight",
    "layer1.0.se.fc1.weight",
    "layer1.0.se.fc1.bias",
    "layer1.0.se.fc2.weight",
    "layer1.0.downsample.0.weight",
    "layer1.0.downsample.1.num_batches_tracked",
    "layer4.2.se.fc2.bias",
    "fc.weight",
]


def test_state_dict_uses_timm_names() -> None:
    keys = set(create_model("seresnet50").state_dict())
    assert set(TIMM_KEYS) <= keys
    assert tuple(create_model("seresnet50").state_dict()["layer1.0.se.fc1.weight"].shape) == (
        16,
        256,
        1,
        1,
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    source = create_model("seresnet18", seed=1, init="random")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # the common wrapper
    target = create_model("seresnet18", seed=2)
    load_into(target, read_state_dict(path), "seresnet18", str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state = create_model("seresnet18").state_dict()
    state["layer1.0.se.fc3.weight"] = state.pop("layer1.0.se.fc2.weight")
    with pytest.raises(CheckpointError) as e:
        load_into(create_model("seresnet18"), state, "seresnet18", "x.pth")
    msg = str(e.value)
    assert "1 missing: layer1.0.se.fc2.weight" in msg
    assert "1 unexpected: layer1.0.se.fc3.weight" in msg


def test_checkpoint_of_another_architecture_is_refused() -> None:
    state = create_model("resnet18").state_dict()
    with pytest.raises(CheckpointError, match=r"missing: .*se\.fc1"):
        load_into(create_model("seresnet18"), state, "seresnet18", "resnet18.pth")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_unknown_architecture() -> None:
    with pytest.raises(UnknownArchitectureError, match="seresnet50"):
        create_model("seresnet51")
