"""What a network's layers are, seen from outside: the embedding (the classifier head's input) and
the addressable layers a request may name.

- `FeaturesAndLogits` wraps a zoo network so one forward pass returns (logits, features), where
  features are the input of the final classifier layer (`ArchSpec.head`): the penultimate
  activations, the embedding that similarity search and transfer learning run on. The head is the
  last operation of every zoo `forward` (nothing follows `self.fc(x)` or `self.classifier(x)`), so
  running the network with the head replaced by an identity gives exactly its input; the wrapper
  then applies the head itself. Exported as ONNX's second output, `features`.
- `addressable_layers` lists every module a forward pass at the native input size runs, with its
  output shape: the names Explain's neuron target, Dream and FeatureMaps accept. Written into
  metadata.json at export, so the serving process (no torch) can check names and GetModel can
  list them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

FEATURES_NAME = "features"


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


@contextlib.contextmanager
def _headless(model: nn.Module, head: str) -> Iterator[nn.Module]:
    """`model` with its module at `head` replaced by nn.Identity for the duration; yields the head."""
    parent, attr = _parent_and_attr(model, head)
    original = model.get_submodule(head)
    setattr(parent, attr, nn.Identity())
    try:
        yield original
    finally:
        setattr(parent, attr, original)


class FeaturesAndLogits(nn.Module):
    """(logits, features) of `body` (the network, its head replaced by an identity) in one pass.

    Build it with `features_and_logits(model, head)`, which restores `model` afterwards."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features: torch.Tensor = self.body(x)
        # N x D (the head's in_features)
        logits: torch.Tensor = self.head(features)
        # N x num_classes
        return logits, features


@contextlib.contextmanager
def features_and_logits(model: nn.Module, head: str) -> Iterator[FeaturesAndLogits]:
    """A FeaturesAndLogits over `model` (eval mode) whose classifier layer is `head` (a module path,
    ArchSpec.head); `model` gets its head back when the block ends. The wrapper shares the
    model's parameters: no copy, even of VGG-19's 550 MB."""
    if not isinstance(model.get_submodule(head), nn.Linear):
        raise ValueError(f"{head!r} is not the network's final nn.Linear")
    with _headless(model, head) as original:
        yield FeaturesAndLogits(model, original).eval()


def features_dim(model: nn.Module, head: str) -> int:
    """D: the embedding's length, the head's in_features."""
    layer = model.get_submodule(head)
    assert isinstance(layer, nn.Linear)
    return int(layer.in_features)


def addressable_layers(model: nn.Module, input_shape: Sequence[int]) -> list[dict[str, Any]]:
    """Every module of eval-mode `model` that one forward pass at `input_shape` (C, H, W) runs,
    exactly once, in the order they finish: [{"name", "shape" (without the batch), "kind"}].

    Containers count (ResNet's "layer2", GoogLeNet's "inception4c", a Sequential's "features"), the
    root does not; modules that do not run in eval mode (GoogLeNet's auxiliary heads) or run more
    than once are left out (a name must mean one tensor). Runs on the meta device: shapes only, no
    arithmetic, no copy of the weights.
    """
    seen: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    order: list[str] = []
    kinds: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and name not in seen:
                seen[name] = [int(d) for d in output.shape[1:]]
                order.append(name)

        kinds[name] = type(module).__name__
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _forward_on_meta(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [{"name": n, "shape": seen[n], "kind": kinds[n]} for n in order if calls[n] == 1]


def _forward_on_meta(model: nn.Module, input_shape: Sequence[int]) -> None:
    """One forward pass of batch 1 with every parameter and buffer on the meta device, restored
    afterwards (torch.func.functional_call swaps them for the call only)."""
    meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    torch.func.functional_call(model, meta, (torch.empty(1, *input_shape, device="meta"),))


__all__ = [
    "FEATURES_NAME",
    "FeaturesAndLogits",
    "addressable_layers",
    "features_and_logits",
    "features_dim",
]
