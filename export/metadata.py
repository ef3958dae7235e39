"""metadata.json, schema version 1 (docs/ARCHITECTURE.md): the files a version holds and
`validate_metadata`, the one check every reader and writer of a version applies.

Torch-free like export.repository, which reads and writes versions with it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from export.errors import MetadataError
from export.preprocessing import Preprocessing

SCHEMA_VERSION = 1
METADATA = "metadata.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
REQUIRED_FILES = (ONNX_FILE, WEIGHTS_FILE)
# What `architecture` says of a model imported as ONNX (export.importing): no zoo architecture, no
# weights.pt, no PyTorch module; metadata.json's `imported` object says where it came from.
IMPORTED_ARCHITECTURE = "imported-onnx"
DTYPES = ("float32", "float16")
# Model names are path components and appear in URLs, metric labels and `name:version` selections.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # a plain file name: no "/", no ".."
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# The capabilities that need the PyTorch module (weights.pt): never an import's.
GRADIENT_CAPABILITIES = ("explain", "dream", "stylize", "feature_maps", "filters")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON's true is no version number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require(meta: Mapping[str, Any], key: str, ok: bool, what: str, where: str) -> None:
    if not ok:
        shown = json.dumps(meta.get(key)) if key in meta else "missing"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise MetadataError(f"{where}: field {key!r} must be {what}, got {shown}")


def _require_field(
    meta: Mapping[str, Any], key: str, ok: Callable[[Any], bool], what: str, where: str
) -> None:
    """`meta[key]` must be present and pass `ok`."""
    _require(meta, key, key in meta and ok(meta.get(key)), what, where)


def _check_input_output(meta: dict[str, Any], where: str) -> None:
    """`input` and `output`: name, shape and dtype each, and the same dtype for both."""
    num_classes = meta["num_classes"]
    for key, shape_ok, shape_what in (
        ("input", lambda s: len(s) == 3, "[C, H, W]"),
        ("output", lambda s: s == [num_classes], f"[num_classes] = [{num_classes}]"),
    ):
        _require_field(meta, key, lambda v: isinstance(v, dict), "an object", where)
        sub = meta[key]
        _require(
            sub, "name", isinstance(sub.get("name"), str) and bool(sub["name"]), "a string", f"{where}: {key}"
        )
        _require(
            sub,
            "shape",
            isinstance(sub.get("shape"), list)
            and all(is_int(d) and d >= 1 for d in sub["shape"])
            and shape_ok(sub["shape"]),
            shape_what,
            f"{where}: {key}",
        )
        _require(sub, "dtype", sub.get("dtype") in DTYPES, " or ".join(DTYPES), f"{where}: {key}")
    if "description" in meta["input"]:
        _require(
            meta["input"],
            "description",
            isinstance(meta["input"]["description"], str),
            "a string",
            f"{where}: input",
        )
    if meta["input"]["dtype"] != meta["output"]["dtype"]:
        raise MetadataError(f"{where}: input dtype {meta['input']['dtype']} differs from output dtype")


def _check_preprocessing(meta: dict[str, Any], where: str) -> None:
    """`preprocessing` must parse and produce the input shape."""
    _require_field(meta, "preprocessing", lambda v: isinstance(v, dict), "an object", where)
    try:
        pre = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise MetadataError(f"{where}: field 'preprocessing' is invalid: {e}") from None
    if [pre.channels, pre.crop, pre.crop] != meta["input"]["shape"]:
        raise MetadataError(
            f"{where}: preprocessing gives {[pre.channels, pre.crop, pre.crop]} but input shape is "
            f"{meta['input']['shape']}"
        )


def is_imported(meta: Mapping[str, Any]) -> bool:
    """Whether metadata.json describes an imported ONNX model (export.importing): no weights.pt,
    no PyTorch module, so no gradient RPCs."""
    return isinstance(meta.get("imported"), dict)


def _check_files(files: dict[str, Any], where: str, imported: bool = False) -> None:
    """`files`: lists REQUIRED_FILES (model.onnx only for an import), and only plain file names,
    each with its sha256 and size."""
    for required in (ONNX_FILE,) if imported else REQUIRED_FILES:
        if required not in files:
            raise MetadataError(f"{where}: 'files' does not list {required}")
    for fname, entry in files.items():
        if not FILE_RE.match(fname) or fname == METADATA:
            raise MetadataError(
                f"{where}: 'files' lists {fname!r}, which is not a plain file name in the version"
            )
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and bool(_SHA256_RE.match(entry["sha256"]))
            and is_int(entry.get("bytes"))
            and entry["bytes"] >= 0
        )
        if not ok:
            raise MetadataError(f'{where}: files[{fname!r}] must be {{"sha256": <64 hex>, "bytes": <int>}}')


def _check_verification(ver: dict[str, Any], where: str) -> None:
    for key, ok, what in (
        ("batch", lambda v: is_int(v) and v >= 1, "a positive integer"),
        ("max_abs_diff", _is_number, "a number"),
        ("relative_diff", _is_number, "a number"),
        ("top1_equal", lambda v: isinstance(v, bool), "true or false"),
    ):
        _require_field(ver, key, ok, what, f"{where}: verification")


def _check_features(meta: dict[str, Any], where: str) -> None:
    """`features` (optional: versions exported before embeddings lack it): the embedding output,
    its name differing from the logits', shape [D] and the model's dtype."""
    if "features" not in meta:
        return
    _require_field(meta, "features", lambda v: isinstance(v, dict), "an object", where)
    sub, at = meta["features"], f"{where}: features"
    _require(
        sub,
        "name",
        isinstance(sub.get("name"), str) and bool(sub["name"]) and sub["name"] != meta["output"]["name"],
        "a string other than the logits' name",
        at,
    )
    _require(
        sub,
        "shape",
        isinstance(sub.get("shape"), list) and len(sub["shape"]) == 1 and is_int(sub["shape"][0])
        and sub["shape"][0] >= 1,
        "[D], D >= 1",
        at,
    )  # fmt: skip
    _require(sub, "dtype", sub.get("dtype") == meta["output"]["dtype"], "the output's dtype", at)


def _check_layers(meta: dict[str, Any], where: str) -> None:
    """`layers` (optional): [{"name", "shape", "kind"}], names unique."""
    if "layers" not in meta:
        return

    def layer_ok(entry: Any) -> bool:
        return (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and bool(entry["name"])
            and isinstance(entry.get("kind"), str)
            and isinstance(entry.get("shape"), list)
            and all(is_int(d) and d >= 1 for d in entry["shape"])
        )

    layers = meta["layers"]
    ok = isinstance(layers, list) and all(layer_ok(e) for e in layers)
    _require(meta, "layers", ok, 'a list of {"name", "shape": [int], "kind"}', where)
    names = [e["name"] for e in layers]
    if len(set(names)) != len(names):
        raise MetadataError(f"{where}: field 'layers' names a layer twice")


def _check_optional_fields(meta: dict[str, Any], where: str) -> None:
    _check_features(meta, where)
    _check_layers(meta, where)
    for key in ("training", "evaluation", "initialization"):
        if key in meta:
            _require_field(meta, key, lambda v: v is None or isinstance(v, dict), "an object or null", where)
    if "build_kwargs" in meta:
        _require_field(meta, "build_kwargs", lambda v: isinstance(v, dict), "an object", where)
    if "imported" in meta:
        _require_field(meta, "imported", lambda v: isinstance(v, dict), "an object", where)
        if meta["architecture"] != IMPORTED_ARCHITECTURE:
            raise MetadataError(
                f"{where}: an imported model's architecture must be {IMPORTED_ARCHITECTURE!r}, got "
                f"{json.dumps(meta['architecture'])}"
            )
        offered = [k for k in GRADIENT_CAPABILITIES if meta["capabilities"].get(k)]
        if offered:
            raise MetadataError(
                f"{where}: an imported model has no PyTorch module, yet its capabilities offer {offered}"
            )
    elif meta["architecture"] == IMPORTED_ARCHITECTURE:
        raise MetadataError(f"{where}: architecture {IMPORTED_ARCHITECTURE!r} needs the 'imported' object")


def validate_metadata(meta: Any, where: str = METADATA) -> dict[str, Any]:
    """Check `meta` against schema version 1; returns it, or raises MetadataError naming the field.

    Optional fields: `training` (object or null: how the weights were trained), `evaluation`
    (object or null: accuracy of model.onnx on a held-out set), `initialization` (object or null:
    the seed and calibration of random weights), `build_kwargs` (object), `features`
    (the embedding output) and `layers` (the addressable layers), which exports before issue 14
    lack, and `imported` (object: an ONNX model imported with `python -m export import`, which has
    no weights.pt and offers no gradient capability).
    """
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: not a JSON object")

    def req(key: str, ok: Callable[[Any], bool], what: str) -> None:
        _require_field(meta, key, ok, what, where)

    req("schema_version", lambda v: is_int(v), "an integer")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise MetadataError(
            f"{where}: schema_version {meta['schema_version']} is not supported "
            f"(this reader knows {SCHEMA_VERSION})"
        )
    req("name", lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "a model name")
    req("version", lambda v: is_int(v) and v >= 1, "a positive integer")
    req("architecture", lambda v: isinstance(v, str) and bool(v), "a non-empty string")
    req("num_classes", lambda v: is_int(v) and v >= 1, "a positive integer")
    num_classes = meta["num_classes"]
    _check_input_output(meta, where)
    _check_preprocessing(meta, where)
    req(
        "labels",
        lambda v: isinstance(v, list) and len(v) == num_classes and all(isinstance(x, str) for x in v),
        f"a list of {num_classes} strings",
    )
    req("trained", lambda v: isinstance(v, bool), "true or false")
    req("trained_on", lambda v: v is None or (isinstance(v, str) and bool(v)), "a string or null")
    req("parameters", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    req("flops", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    req("fp16", lambda v: isinstance(v, bool), "true or false")
    if meta["fp16"] != (meta["input"]["dtype"] == "float16"):
        raise MetadataError(
            f"{where}: fp16 is {json.dumps(meta['fp16'])} but the input dtype is {meta['input']['dtype']}"
        )
    req(
        "source_checkpoint_sha256",
        lambda v: v is None or (isinstance(v, str) and bool(_SHA256_RE.match(v))),
        "a sha256 hex digest or null",
    )
    req("files", lambda v: isinstance(v, dict), "an object")
    _check_files(meta["files"], where, is_imported(meta))
    req("opset", lambda v: is_int(v) and v >= 1, "a positive integer")
    req("exporters", lambda v: isinstance(v, dict), "an object")
    req("exported_at", lambda v: isinstance(v, str) and bool(v), "a timestamp string")
    req("verification", lambda v: isinstance(v, dict), "an object")
    _check_verification(meta["verification"], where)
    req(
        "capabilities",
        lambda v: isinstance(v, dict) and all(isinstance(x, bool) for x in v.values()) and "classify" in v,
        "an object of booleans with 'classify'",
    )
    _check_optional_fields(meta, where)
    return meta
