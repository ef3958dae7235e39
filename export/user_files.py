"""What a user brings besides the weights: class names (`--labels FILE`) and how an image becomes the
model's input (`--preprocessing FILE` and the flags that override it). Both go into metadata.json,
which is what the service reads: the labels it answers with and the one decode path
(export.preprocessing.to_tensor) every request goes through.

Labels file: UTF-8 text, one class name per line, in the order of the model's outputs. Leading and
trailing spaces are stripped; a final newline is optional. A blank line or a name given twice is
refused (both are almost always a mistake, and a duplicate makes answers ambiguous).

Preprocessing file: a JSON object with any of

    {"color_mode": "RGB" | "L", "resize": 256, "crop": 224,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "invert": false}

`resize` is the shorter side after resizing (bilinear), `crop` the centre square taken then, `mean`
and `std` per channel on pixel / 255, `invert` flips pixel values (255 - v) first, for a model
trained on light-on-dark images. Fields not given come from the architecture's own preprocessing
(`export onnx`); an import has no architecture, so there every field but `resize` (default: crop)
and `invert` (default false) is required. Any other key is refused.

Torch-free: `python -m export import` uses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.errors import UsageError
from export.preprocessing import Preprocessing

MAX_LABELS_BYTES = 16 << 20  # ImageNet-21k's names are about 1 MB
MAX_LABEL_CHARS = 1000
PREPROCESSING_KEYS = ("color_mode", "resize", "crop", "mean", "std", "invert")
REQUIRED_WITHOUT_BASE = ("color_mode", "crop", "mean", "std")


def read_labels(path: str | Path) -> list[str]:
    """The class names in `path`, one per line. Raises UsageError naming the file and the line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_LABELS_BYTES:
            raise UsageError(f"labels file {path} is over {MAX_LABELS_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"labels file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"labels file {path} is a directory") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"labels file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"labels file {path} cannot be read: {e.strerror or e}") from None
    lines = text.removeprefix("\ufeff").splitlines()
    labels = [line.strip() for line in lines]
    if not labels:
        raise UsageError(f"labels file {path} is empty: write one class name per line")
    seen: dict[str, int] = {}
    for number, label in enumerate(labels, start=1):
        if not label:
            raise UsageError(f"labels file {path} line {number} is blank: every line names one class")
        if len(label) > MAX_LABEL_CHARS:
            raise UsageError(f"labels file {path} line {number} is over {MAX_LABEL_CHARS} characters")
        if label in seen:
            raise UsageError(f"labels file {path} names {label!r} twice (lines {seen[label]} and {number})")
        seen[label] = number
    return labels


def check_label_count(labels: list[str], num_classes: int, source: str) -> None:
    """UsageError unless there is one label per class."""
    if len(labels) != num_classes:
        raise UsageError(
            f"{source} has {len(labels)} labels but the model has {num_classes} classes: "
            "give one class name per line, in the order of the model's outputs"
        )


def read_preprocessing_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path` (keys checked, values not yet). Raises UsageError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"preprocessing file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"preprocessing file {path} cannot be read: {getattr(e, 'strerror', None) or e}"
        ) from None
    except json.JSONDecodeError as e:
        raise UsageError(f"preprocessing file {path} is not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise UsageError(f"preprocessing file {path} must hold a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - set(PREPROCESSING_KEYS))
    if unknown:
        raise UsageError(
            f"preprocessing file {path} has unknown keys {unknown}; known: {', '.join(PREPROCESSING_KEYS)}"
        )
    return data


def _numbers(value: Any, key: str, where: str) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise UsageError(f"{where}: {key} must be a list of numbers, got {json.dumps(value)}")
    return tuple(float(v) for v in value)


def make_preprocessing(fields: Mapping[str, Any], base: Preprocessing | None, where: str) -> Preprocessing:
    """`fields` (from a file and flags, already merged) over `base` (None: an import, which has no
    architecture to take defaults from). Raises UsageError naming what is wrong."""
    if base is None:
        missing = [key for key in REQUIRED_WITHOUT_BASE if key not in fields]
        if missing:
            raise UsageError(
                f"{where}: an imported model's preprocessing must give {', '.join(missing)} "
                "(--preprocessing FILE or --color-mode/--crop/--mean/--std)"
            )
        merged: dict[str, Any] = {"resize": fields["crop"], "invert": False}
    else:
        merged = base.to_dict()
    merged.update(fields)
    color_mode = merged["color_mode"]
    if color_mode not in ("RGB", "L"):
        raise UsageError(
            f'{where}: color_mode must be "RGB" or "L" (grayscale), got {json.dumps(color_mode)}'
        )
    for key in ("resize", "crop"):
        value = merged[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8192):
            raise UsageError(f"{where}: {key} must be an integer 1..8192, got {json.dumps(value)}")
    if not isinstance(merged["invert"], bool):
        raise UsageError(f"{where}: invert must be true or false, got {json.dumps(merged['invert'])}")
    mean, std = _numbers(merged["mean"], "mean", where), _numbers(merged["std"], "std", where)
    channels = 1 if color_mode == "L" else 3
    if len(mean) != channels or len(std) != channels:
        raise UsageError(
            f"{where}: color_mode {color_mode} needs {channels} mean and std values, got "
            f"{len(mean)} and {len(std)}"
        )
    if not all(s > 0 for s in std):
        raise UsageError(f"{where}: std must be positive, got {list(std)}")
    if merged["crop"] > merged["resize"]:
        raise UsageError(f"{where}: crop {merged['crop']} is larger than resize {merged['resize']}")
    return Preprocessing(
        color_mode=color_mode,
        resize=merged["resize"],
        crop=merged["crop"],
        mean=mean,
        std=std,
        invert=merged["invert"],
    )


__all__ = [
    "PREPROCESSING_KEYS",
    "check_label_count",
    "make_preprocessing",
    "read_labels",
    "read_preprocessing_file",
]
