"""Safe, strict checkpoint loading.

A checkpoint is read only with `torch.load(..., weights_only=True, map_location="cpu")`: the
restricted unpickler builds tensors and plain containers and refuses any other global, so a file
that would run code when unpickled is rejected before any of it runs.

Accepted layouts: a bare state_dict, or a dict wrapping one under "state_dict", "model_state_dict",
"model" or "net" (other entries such as "epoch" or "optimizer" are ignored); a "module." prefix on
every key (nn.DataParallel / DistributedDataParallel) is stripped.

The state_dict is then compared against the model's own before anything is copied: missing,
unexpected and wrongly-shaped keys are reported together in one message and nothing is loaded
(never a partial load). BatchNorm's `num_batches_tracked` counters may be absent, as they are in
checkpoints saved before PyTorch 0.4.1 (torchvision's resnet18/34/50/101/152 files among them):
they are training bookkeeping, not weights, and BatchNorm fills them in itself.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.errors import CheckpointError
from export.repository import sha256_file

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
MAX_LISTED = 5  # keys named per category in an error message; the rest are counted


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unsafe_global(message: str) -> str | None:
    """The global a weights_only load refused, from torch's error text (which names it)."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _refusal(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", message, re.S)
    return _one_line(match.group(1) if match else message, 120)


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Unpickle `path` with the weights-only unpickler, onto the CPU. Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty")
        with warnings.catch_warnings():
            # torch warns before trying a pickle protocol newer than its own; the outcome (a load
            # or a CheckpointError) is all the caller needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, weights_only=True, map_location="cpu")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        name = _unsafe_global(str(e))
        if name is not None:
            raise CheckpointError(
                f"checkpoint {path} was refused: it references {name}, which is not tensor data "
                "(loading it could run code; only weights_only checkpoints are accepted)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint the weights-only loader can read "
            f"(pickle data it refuses: {_refusal(str(e))})"
        ) from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} cannot be read: permission denied") from None
    except (
        RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError, IndexError,
        AssertionError,
    ) as e:  # fmt: skip
        # Truncated zips, bit flips, random bytes and non-torch pickles end up here with torch's
        # (multi-line) explanation. Random bytes read as a legacy pickle can also fail inside
        # torch's weights-only unpickler with IndexError ("pop from empty list", an opcode with an
        # empty stack) or its AssertionError: seen about once in a few hundred runs of the test.
        detail = _one_line(str(e)) if len(str(e)) > 20 else f"{type(e).__name__} {e}"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint: {detail}") from None


def extract_state_dict(obj: Any, source: str = "checkpoint") -> OrderedDict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint: unwrapped, "module."-stripped, tensors only."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    if not obj:
        raise CheckpointError(f"{source} holds an empty state_dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} is not a state_dict: {len(bad)} entries are not tensors ({_listing(bad)}); "
            f"a wrapper should keep the weights under one of {', '.join(WRAPPER_KEYS)}"
        )
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        keys = [k[len("module.") :] for k in keys]
    # A fresh OrderedDict on purpose: it carries no `_metadata`, so BatchNorm treats a checkpoint
    # without num_batches_tracked as the old format it is and fills the counters in.
    return OrderedDict((k, v) for k, v in zip(keys, obj.values(), strict=True))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """None if `state_dict` fits `model` exactly, else a one-line description of every difference."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {_shape(state_dict[k])} (model {_shape(v)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} wrongly shaped ({_listing(wrong)})")
    non_float = [
        k
        for k, v in state_dict.items()
        if k in expected and v.is_floating_point() != expected[k].is_floating_point()
    ]
    if non_float:
        problems.append(f"{len(non_float)} with the wrong kind of dtype ({_listing(non_float)})")
    return "; ".join(problems) or None


def read_state_dict(path: str | os.PathLike[str]) -> OrderedDict[str, torch.Tensor]:
    """The state_dict in checkpoint `path` (read_checkpoint + extract_state_dict)."""
    return extract_state_dict(read_checkpoint(path), f"checkpoint {path}")


def head_classes(state_dict: Mapping[str, torch.Tensor], head: str) -> int | None:
    """The number of classes the checkpoint's classifier layer `head` (ArchSpec.head, an nn.Linear)
    outputs: the rows of `<head>.weight`; None when the checkpoint has no such 2-D weight (it is
    not this architecture's: loading it then names every key that does not fit)."""
    weight = state_dict.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    arch: str,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Load checkpoint `path` into `model` (architecture `arch`, for messages); returns its sha256.
    `state_dict`: the checkpoint's, already read with `read_state_dict` (not read again).

    Raises CheckpointError, naming the file, if it is missing, unreadable, unsafe, or does not fit
    the model exactly; in that case the model is left untouched.
    """
    if state_dict is None:
        state_dict = read_state_dict(path)
    problem = mismatch(model, state_dict)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} does not fit {arch}: {problem}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # pragma: no cover - mismatch() reports everything strict loading checks
        raise CheckpointError(f"checkpoint {path} does not fit {arch}: {_one_line(str(e))}") from None
    return sha256_file(path)
