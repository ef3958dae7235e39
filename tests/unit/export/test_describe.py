"""describe(): figures measured from the modules agree with the papers and with hand computation."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from export.describe import describe, describe_all, describe_model, format_table
from export.models import ARCHITECTURES, UnknownArchitecture
from export.models.alexnet import alexnet
from export.models.googlenet import googlenet


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in describe_all()}


def _googlenet_row(**kwargs: Any) -> dict[str, Any]:
    with torch.device("meta"):
        model = googlenet(**kwargs)
    return describe_model(model, (3, 224, 224), "googlenet")


def test_describe_all_covers_the_registry_in_order(rows: dict[str, dict[str, Any]]) -> None:
    assert list(rows) == list(ARCHITECTURES)
    assert [row["name"] for row in describe_all(["resnet18", "lenet5"])] == ["resnet18", "lenet5"]


def test_unknown_name() -> None:
    with pytest.raises(UnknownArchitecture, match="lenet5"):
        describe("lenet6")


def test_lenet5(rows: dict[str, dict[str, Any]]) -> None:
    row = rows["lenet5"]
    assert row["parameters"] == row["parameters_without_aux"] == 61_706  # "about 60k"
    assert (row["depth"], row["layers_with_pooling"]) == (5, 7)  # C1 C3 C5 F6 output; + S2, S4
    assert (row["conv_layers"], row["fc_layers"], row["pooling_layers"]) == (3, 2, 2)
    assert row["conv_kernel_sizes"] == ["5x5"]
    assert row["activations"] == ["Tanh"]
    assert row["pooling"] == ["AvgPool2d"]
    assert row["normalization"] == []
    assert row["input_shape"] == [1, 32, 32]
    # By hand: C1 28*28*6 outputs x 1*5*5, C3 10*10*16 x 6*5*5, C5 120 x 16*5*5, F6 120*84, out 84*10.
    assert row["flops"] == 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 120 * 400 + 120 * 84 + 84 * 10


@pytest.mark.parametrize("name", ["alexnet", "alexnet_torchvision"])
def test_alexnet_both_variants(rows: dict[str, dict[str, Any]], name: str) -> None:
    row = rows[name]
    assert 60_000_000 <= row["parameters"] <= 62_400_000  # "about 60M"
    assert (row["depth"], row["conv_layers"], row["fc_layers"]) == (8, 5, 3)
    assert row["conv_kernel_sizes"] == ["11x11", "5x5", "3x3"]
    assert row["activations"] == ["ReLU"]
    assert "MaxPool2d" in row["pooling"]


def test_alexnet_paper_vs_torchvision(rows: dict[str, dict[str, Any]]) -> None:
    assert rows["alexnet"]["parameters"] == 62_378_344
    assert rows["alexnet"]["normalization"] == ["LocalResponseNorm"]
    assert rows["alexnet_torchvision"]["normalization"] == []
    assert rows["alexnet_torchvision"]["flops"] == pytest.approx(0.714e9, rel=0.01)


def test_googlenet(rows: dict[str, dict[str, Any]]) -> None:
    row = rows["googlenet"]
    assert row["parameters"] == 13_004_888  # the checkpoint, aux heads included
    assert row["parameters_without_aux"] == 6_624_904
    assert (row["depth"], row["layers_with_pooling"]) == (22, 27)  # the paper's count
    assert row["fc_layers"] == 1  # the aux classifiers do not run at inference
    assert row["conv_kernel_sizes"] == ["7x7", "3x3", "1x1"]  # torchvision's "5x5" is 3x3
    assert row["normalization"] == ["BatchNorm2d"]
    assert row["flops"] == pytest.approx(1.5e9, rel=0.02)


@pytest.mark.parametrize("true_5x5", [False, True])
def test_googlenet_variants_without_aux(true_5x5: bool) -> None:
    row = _googlenet_row(true_5x5=true_5x5)
    # The paper's "about 6.8M". The 5x5 variant with batch norm comes to 7,005,832 (the 3x3 one plus
    # 9 x reduce x out x 16), slightly above the paper, whose table counts weights in units of 1024.
    assert 6_600_000 <= row["parameters_without_aux"] <= 7_010_000
    assert row["parameters_without_aux"] < row["parameters"]
    assert row["depth"] == 22
    assert ("5x5" in row["conv_kernel_sizes"]) is true_5x5
    same = _googlenet_row(true_5x5=true_5x5, aux_logits=False)
    assert same["parameters"] == same["parameters_without_aux"] == row["parameters_without_aux"]


@pytest.mark.parametrize(
    ("name", "depth", "parameters", "gmacs"),
    [
        ("resnet18", 18, 11_689_512, 1.81),
        ("resnet34", 34, 21_797_672, 3.66),
        ("resnet50", 50, 25_557_032, 4.09),
        ("resnet101", 101, 44_549_160, 7.80),
        ("resnet152", 152, 60_192_808, 11.51),
    ],
)
def test_resnets(
    rows: dict[str, dict[str, Any]], name: str, depth: int, parameters: int, gmacs: float
) -> None:
    row = rows[name]
    assert row["depth"] == depth  # projection shortcuts lie on the shorter path
    assert row["parameters"] == parameters
    assert row["flops"] / 1e9 == pytest.approx(gmacs, abs=0.01)  # torchvision's published GFLOPS
    assert row["conv_kernel_sizes"] == ["7x7", "3x3", "1x1"]
    assert row["normalization"] == ["BatchNorm2d"]


def test_resnet50_macs_in_range(rows: dict[str, dict[str, Any]]) -> None:
    assert 3.9e9 <= rows["resnet50"]["flops"] <= 4.2e9
    assert rows["resnet50"]["parameters"] == 25_557_032


def test_vgg19(rows: dict[str, dict[str, Any]]) -> None:
    row = rows["vgg19"]
    assert (row["depth"], row["conv_layers"], row["fc_layers"]) == (19, 16, 3)
    assert row["conv_kernel_sizes"] == ["3x3"]
    assert row["flops"] == pytest.approx(19.6e9, rel=0.01)
    assert row["normalization"] == []


def test_measured_not_looked_up() -> None:
    with torch.device("meta"):
        small = describe_model(alexnet(num_classes=10), (3, 224, 224), "alexnet")
    assert small["parameters"] == 62_378_344 - 4096 * 990 - 990
    assert small["flops"] == describe("alexnet")["flops"] - 4096 * 990


class _Branches(nn.Module):
    """conv -> (one conv | three convs | pool) -> concat -> linear: the longest path has 5 layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.short = nn.Conv2d(2, 2, 1)
        self.long = nn.Sequential(*(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 1, 1))
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.short(x), self.long(x), self.pool(x)], 1)
        return self.head(torch.flatten(x, 1))  # type: ignore[no-any-return]


def test_depth_is_the_longest_path() -> None:
    row = describe_model(_Branches(), (1, 4, 4), "branches")
    assert row["depth"] == 5  # stem + 3 long + head; the 1x1 shortcut is shorter
    assert row["layers_with_pooling"] == 5  # the pooling branch (3 pools) ties the conv branch
    assert (row["conv_layers"], row["pooling_layers"], row["fc_layers"]) == (5, 3, 1)
    assert row["conv_kernel_sizes"] == ["3x3", "1x1"]
    assert row["flops"] == 16 * 2 * 9 + 16 * 2 * 2 + 3 * 16 * 2 * 18 + 96 * 3
    assert row["activations"] == []


def test_rows_are_json_serializable(rows: dict[str, dict[str, Any]]) -> None:
    as_list = list(rows.values())
    assert json.loads(json.dumps(as_list)) == as_list


def test_format_table(rows: dict[str, dict[str, Any]]) -> None:
    table = format_table(list(rows.values()))
    header, rule, *body = table.splitlines()
    assert header.split() == list(ARCHITECTURES)
    assert set(rule) <= {"-", " "}
    labels = [line.split("  ")[0] for line in body if not line.startswith(" ")]
    assert "parameters" in labels and "MACs / image" in labels and "depth (conv+fc)" in labels
    params = next(line for line in body if line.startswith("parameters "))
    assert params.split()[1:] == [
        "61.71K", "62.38M", "61.10M", "13.00M", "11.69M", "21.80M", "25.56M", "44.55M", "60.19M", "143.67M"
    ]  # fmt: skip
    macs = next(line for line in body if line.startswith("MACs / image"))
    assert "4.09G" in macs.split() and "416.52K" in macs.split()
    assert format_table([]) == ""
