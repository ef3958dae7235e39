"""Architecture analysis measured from the modules themselves: parameters, depth, layers, MACs.

Nothing here is a table of known figures. Every number comes from building the network from the
registry and looking at it:

- parameter counts from the parameters (and, for the inference path, from the modules that actually
  run in eval mode, which drops GoogLeNet's auxiliary heads);
- layer counts, kernel sizes, activation / pooling / normalization kinds and multiply-accumulates
  from forward hooks during one eval-mode forward pass at the native input shape;
- depth from the longest path through the `torch.fx` graph of the eval-mode forward, so parallel
  Inception branches and ResNet shortcuts are counted the way the papers count them.

Networks are built on PyTorch's "meta" device: shapes propagate but no weights are allocated or
computed, so describing VGG-19 costs no 550 MB and no real convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from export.models import ARCHITECTURES, get_spec

__all__ = ["describe", "describe_all", "describe_model", "format_table"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LEARNABLE = (*_CONV, nn.Linear)
# Classify other modules by the torch.nn file that defines them, so a new kind (nn.GELU, nn.LPPool2d,
# nn.GroupNorm) is recognised without a list to keep up to date.
_ACTIVATION_MODULES = ("torch.nn.modules.activation",)
_POOLING_MODULES = ("torch.nn.modules.pooling",)
_NORMALIZATION_MODULES = (
    "torch.nn.modules.batchnorm",
    "torch.nn.modules.normalization",
    "torch.nn.modules.instancenorm",
)


def _kind(module: nn.Module, modules: tuple[str, ...]) -> bool:
    return type(module).__module__ in modules


def _is_pooling(module: nn.Module) -> bool:
    return _kind(module, _POOLING_MODULES)


def _macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """Multiply-accumulates of one call of a conv or linear module, per sample."""
    if isinstance(module, _CONV):
        batch = output.shape[0]
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return int(output.numel() // batch * per_output)
    if isinstance(module, nn.Linear):
        batch = output.shape[0]
        return int(output.numel() // batch * module.in_features)
    return 0


def _is_learnable(module: nn.Module) -> bool:
    return isinstance(module, _LEARNABLE)


def _is_layer_or_pooling(module: nn.Module) -> bool:
    return _is_learnable(module) or _is_pooling(module)


def _longest_path(graph_module: fx.GraphModule, counted: Callable[[nn.Module], bool]) -> int:
    """Counted layers on the longest input -> output path of the traced graph."""
    depth: dict[fx.Node, int] = {}
    for node in graph_module.graph.nodes:  # fx graphs are topologically ordered
        before = max((depth[n] for n in node.all_input_nodes), default=0)
        here = node.op == "call_module" and counted(graph_module.get_submodule(str(node.target)))
        depth[node] = before + int(here)
        if node.op == "output":
            return depth[node]
    raise ValueError("the traced graph has no output node")


def describe_model(model: nn.Module, input_shape: Sequence[int], name: str) -> dict[str, Any]:
    """Measure `model` (any nn.Module taking one N x C x H x W tensor) at `input_shape` (C, H, W).

    The forward pass runs once, in eval mode, with batch 1 on the model's device (use the meta device
    to make it free). See `describe` for the keys.
    """
    model = model.eval()
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")

    calls: dict[nn.Module, int] = {}
    macs = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal macs
        calls[module] = calls.get(module, 0) + 1
        macs += _macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    ran = list(calls)

    # Parameters owned by the modules that ran: GoogLeNet's eval forward never calls its aux heads.
    inference_params = {id(p): p for m in ran for p in m.parameters(recurse=False)}
    graph_module = fx.symbolic_trace(model)

    convs = [m for m in ran if isinstance(m, _CONV)]
    kernels = sorted({tuple(m.kernel_size) for m in convs}, key=lambda k: (math.prod(k), k), reverse=True)
    return {
        "name": name,
        "parameters": sum(p.numel() for p in params),
        "parameters_without_aux": sum(p.numel() for p in inference_params.values()),
        "depth": _longest_path(graph_module, _is_learnable),
        "layers_with_pooling": _longest_path(graph_module, _is_layer_or_pooling),
        "conv_layers": sum(calls[m] for m in convs),
        "fc_layers": sum(calls[m] for m in ran if isinstance(m, nn.Linear)),
        "pooling_layers": sum(calls[m] for m in ran if _is_pooling(m)),
        "conv_kernel_sizes": ["x".join(str(k) for k in kernel) for kernel in kernels],
        "flops": macs,
        "input_shape": list(input_shape),
        "activations": sorted({type(m).__name__ for m in ran if _kind(m, _ACTIVATION_MODULES)}),
        "pooling": sorted({type(m).__name__ for m in ran if _is_pooling(m)}),
        "normalization": sorted({type(m).__name__ for m in ran if _kind(m, _NORMALIZATION_MODULES)}),
    }


def describe(name: str) -> dict[str, Any]:
    """Describe registry architecture `name`, built with its defaults, at its native input shape.

    Keys (all JSON-serializable):
      name, input_shape ([C, H, W]);
      parameters: every parameter, auxiliary heads included (what the checkpoint holds);
      parameters_without_aux: parameters of the modules an eval-mode forward runs (GoogLeNet without
        its auxiliary classifiers; equal to `parameters` elsewhere);
      depth: conv + linear layers on the longest input -> output path of the eval-mode graph, the
        papers' count (22 for GoogLeNet, 50 for ResNet-50: projection shortcuts lie on a shorter path);
      layers_with_pooling: the same path counting pooling layers too (27 for GoogLeNet, 7 for LeNet-5);
      conv_layers, fc_layers, pooling_layers: modules of each kind called in an eval-mode forward;
      conv_kernel_sizes: distinct kernel sizes, largest first, e.g. ["11x11", "5x5", "3x3"];
      flops: multiply-accumulates for one image at the native input, from conv (output elements x
        in_channels / groups x kernel area) and linear (in x out) layers only. Excluded: biases,
        batch norm, LRN, activations, pooling, residual additions, concatenation and dropout, which
        together are well under 1% for these networks. This is the convention of torchvision's and
        the papers' "FLOPs" (ResNet-50: 4.09 G);
      activations, pooling, normalization: sorted class names of such modules that ran.

    Raises `export.models.UnknownArchitecture` for a name not in the registry.
    """
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.builder(num_classes=spec.num_classes)
    return describe_model(model, spec.input_shape, name)


def describe_all(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """`describe` each of `names` (default: every registry architecture, in registry order)."""
    return [describe(name) for name in (ARCHITECTURES if names is None else names)]


def _human(n: int) -> str:
    for value, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= value:
            return f"{n / value:.2f}{suffix}"
    return str(n)


def _cell(key: str, value: Any) -> list[str]:
    """The lines of one table cell; lists of class names take a line each to keep columns narrow."""
    if key == "input_shape":
        return ["x".join(str(v) for v in value)]
    if key == "conv_kernel_sizes":
        return [" ".join(value) or "-"]
    if isinstance(value, list):
        return [str(v) for v in value] or ["-"]
    if key in ("parameters", "parameters_without_aux", "flops"):
        return [_human(value)]
    return [str(value)]


_ROW_LABELS = {
    "parameters": "parameters",
    "parameters_without_aux": "parameters (no aux)",
    "depth": "depth (conv+fc)",
    "layers_with_pooling": "depth with pooling",
    "conv_layers": "conv layers",
    "fc_layers": "fc layers",
    "pooling_layers": "pooling layers",
    "conv_kernel_sizes": "conv kernels",
    "flops": "MACs / image",
    "input_shape": "input",
    "activations": "activations",
    "pooling": "pooling",
    "normalization": "normalization",
}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A side-by-side table: one column per architecture, one row per attribute.

    Counts are human readable (25.56M parameters, 4.09G MACs); the exact values are in the rows.
    """
    if not rows:
        return ""
    table: list[list[list[str]]] = [[[""], *([str(row["name"])] for row in rows)]]
    for key, label in _ROW_LABELS.items():
        table.append([[label], *(_cell(key, row[key]) for row in rows)])
    widths = [max(len(line) for row in table for line in row[i]) for i in range(len(rows) + 1)]
    rendered: list[str] = []
    for index, row in enumerate(table):
        for n in range(max(len(cell) for cell in row)):
            parts = [(cell[n] if n < len(cell) else "") for cell in row]
            line = [parts[0].ljust(widths[0])] + [
                p.rjust(w) for p, w in zip(parts[1:], widths[1:], strict=True)
            ]
            rendered.append("  ".join(line).rstrip())
        if index == 0:
            rendered.append("  ".join("-" * w for w in widths))
    return "\n".join(rendered)
