"""export.receptive_field against receptive fields computed by hand from the architectures'
kernels, strides and paddings (jump = product of strides; each k x k layer with padding p widens
the field by (k - 1) * jump and shifts its start by -p * jump)."""

from __future__ import annotations

import pytest

from export.models import ARCHITECTURES, build
from export.receptive_field import Axis, receptive_field, receptive_fields


@pytest.fixture(scope="module")
def resnet18():  # type: ignore[no-untyped-def]
    return build("resnet18")


def test_resnet18_conv1_unit_i_sees_rows_2i_minus_3_to_2i_plus_4(resnet18) -> None:  # type: ignore[no-untyped-def]
    field = receptive_field(resnet18, (3, 224, 224), "conv1")
    assert field.rows == field.cols == Axis(jump=2, start=-3, end=4)  # 7x7, stride 2, padding 3
    assert field.at(10, 0, 224, 224) == (17, 0, 24, 4)  # column 0: clipped at the left edge


def test_resnet18_stem_layer2_and_layer4(resnet18) -> None:  # type: ignore[no-untyped-def]
    fields = receptive_fields(resnet18, (3, 224, 224), ["maxpool", "layer1", "layer2", "layer4", "fc"])
    # maxpool 3x3 s2 p1 after conv1: (jump 4, start -3 - 1*2, end 4 + 2*2)
    assert fields["maxpool"].rows == Axis(4, -5, 6)
    # layer1: four 3x3 convs at jump 4, padding 1 each: +-16
    assert fields["layer1"].rows == Axis(4, -21, 22)
    # layer2: its first conv has stride 2 (jump 8 after it), then three more 3x3 convs at jump 8;
    # the 1x1 stride-2 shortcut's field (Axis(8, -21, 22)) is inside the main branch's: 99 px
    assert fields["layer2"].rows == Axis(8, -21 - 4 - 3 * 8, 22 + 4 + 3 * 8)
    assert fields["layer2"].size == (99, 99)
    assert fields["layer4"].size == (435, 435)  # the published ResNet-18 receptive field
    assert fields["fc"].whole  # after the global pool: every pixel


def test_shortcut_alone_is_narrower_than_its_block(resnet18) -> None:  # type: ignore[no-untyped-def]
    fields = receptive_fields(resnet18, (3, 224, 224), ["layer2.0.downsample.0", "layer2.0"])
    assert fields["layer2.0.downsample.0"].rows == Axis(8, -21, 22)  # 1x1 stride 2 over layer1
    assert fields["layer2.0"].rows == Axis(8, -21 - 4 - 8, 22 + 4 + 8)  # conv1 (s2) + conv2


@pytest.mark.parametrize(
    ("arch", "conv4", "conv5"),
    [("alexnet", "features.10", "features.12"), ("alexnet_torchvision", "features.8", "features.10")],
)
def test_alexnet_by_hand(arch: str, conv4: str, conv5: str) -> None:
    model = build(arch)
    f = receptive_fields(model, ARCHITECTURES[arch].input_shape, ["features.0", conv4, conv5])
    # conv1 11x11 s4 p2 -> pool 3 s2 -> conv2 5x5 p2 -> pool 3 s2 -> conv3, conv4, conv5 3x3 p1
    assert f["features.0"].rows == Axis(4, -2, 9)
    # start: -2 (conv1) - 2*8 (conv2's padding at jump 8) - 16 - 16 (conv3, conv4 at jump 16)
    # end: 9 + 2*4 (pool1) + (4-2)*8 (conv2) + 2*8 (pool2) + (2-1)*16 (conv3) + (2-1)*16 (conv4)
    assert f[conv4].rows == Axis(16, -2 - 2 * 8 - 16 - 16, 9 + 2 * 4 + 2 * 8 + 2 * 8 + 16 + 16)
    assert f[conv4].size == (131, 131)
    assert f[conv5].size == (163, 163)


def test_googlenet_inception_is_the_widest_branch() -> None:
    model = build("googlenet")
    f = receptive_fields(
        model,
        (3, 224, 224),
        [
            "maxpool2",
            "inception3a.branch1",
            "inception3a.branch2",
            "inception3a.branch3",
            "inception3a.branch4",
            "inception3a",
        ],
    )
    base = f["maxpool2"].rows
    assert base is not None and base.jump == 8
    assert f["inception3a.branch1"].rows == base  # 1x1
    assert f["inception3a.branch2"].rows == Axis(8, base.start - 8, base.end + 8)  # 1x1 then 3x3
    assert f["inception3a.branch3"].rows == Axis(8, base.start - 8, base.end + 8)  # the "5x5" is 3x3
    assert f["inception3a.branch4"].rows == Axis(8, base.start - 8, base.end + 8)  # 3x3 max pool, 1x1
    assert f["inception3a"].rows == Axis(8, base.start - 8, base.end + 8)


def test_unknown_layer_is_a_value_error(resnet18) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no module"):
        receptive_field(resnet18, (3, 224, 224), "layer9")
