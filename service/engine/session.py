"""One ONNX Runtime session per model version.

The model file is checked before ONNX Runtime sees it (external data must stay inside the model's
folder), the session's inputs and outputs are checked against metadata.json, and `provider` reports
the provider the session really runs on, not the one that was asked for. With an
OptimizedModelCache (service/engine/ort_cache.py) the session opens the graph ONNX Runtime optimized
on an earlier start instead of optimizing it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.external_data import UnsafeLocation, confined_file
from service.catalog import ModelLoadError
from service.engine import onnx_wire
from service.engine.ort_cache import OptimizedModelCache
from service.engine.providers import CUDA, ProviderChoice
from service.settings import Settings

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


class ModelRunError(RuntimeError):
    """A run returned something that cannot be the model's answer (wrong output shape)."""


def session_options(settings: Settings) -> ort.SessionOptions:
    """SessionOptions from the settings; shared by the service and bench/raw_ort.py."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization_level]
    so.intra_op_num_threads = settings.intra_op_threads  # 0: ONNX Runtime picks one per core
    so.inter_op_num_threads = settings.inter_op_threads
    # CNNs are chains of big ops: parallelism belongs inside each op (intra-op), not across them.
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Settings.ort_cpu_mem_arena says what it costs and saves (measured in issue 13).
    so.enable_cpu_mem_arena = settings.ort_cpu_mem_arena
    # Idle intra-op threads spin by default, burning the cores that decode images and run gRPC.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
    # Warnings such as "some nodes were not assigned to the preferred execution provider" are
    # expected on CUDA (shape ops run on CPU); we report what matters ourselves.
    so.log_severity_level = 3
    return so


# --- external data ---------------------------------------------------------------------------------


def check_external_data(model_path: Path, listed_files: Collection[str] | None = None) -> list[Path]:
    """Refuse a model whose external data could read files outside its own folder.

    Every tensor stored as external data must name a relative `location` with no `..`, no
    symlink on the way, resolving to an existing file inside the model's folder. With
    `listed_files` (the names metadata.json lists, each with its sha256), the file must also be one
    of them, so every byte ONNX Runtime reads has been checked against a hash. Runs on the file's
    tensors as onnx_wire reads them (their data skipped, never parsed), before any session exists.
    Returns the external files (empty for the usual self-contained model). Raises ModelLoadError.
    """
    try:
        tensors = onnx_wire.tensors(model_path)
    except (OSError, onnx_wire.WireError) as exc:
        raise ModelLoadError(f"{model_path}: not a readable ONNX model ({exc})") from exc
    folder = model_path.parent.resolve(strict=True)
    files: dict[str, Path] = {}
    for tensor in tensors:
        entries = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not entries:
            continue
        location = entries.get("location", "")
        if location not in files:
            path = _safe_external_path(model_path, folder, tensor.name, location)
            if listed_files is not None and path.relative_to(folder).as_posix() not in listed_files:
                raise ModelLoadError(
                    f"{model_path}: refusing to load: tensor {tensor.name!r} keeps its data in "
                    f"{location!r}, which metadata.json does not list (no sha256 to check it against)"
                )
            files[location] = path
    return list(files.values())


def _safe_external_path(model_path: Path, folder: Path, tensor: str, location: str) -> Path:
    try:
        return confined_file(folder, location)
    except UnsafeLocation as why:
        raise ModelLoadError(
            f"{model_path}: refusing to load: tensor {tensor!r} keeps its data in {location!r}, {why}; "
            "external data must be a plain file inside the model's folder"
        ) from None


# --- the session -----------------------------------------------------------------------------------


class ModelSession:
    """An onnxruntime.InferenceSession for one model version.

    `run(batch)` takes an (N, C, H, W) float32 (or the model's dtype) array and returns float32
    logits (N, K), or, for a model with a features output (`features_name`), one float32 array
    (N, K + D): the logits then the features, so one run feeds both and the batcher moves one
    array per batch (service/engine/engine.py slices what a request asked for). fp16 models are
    served as exported: the input is cast to float16 and the float16 outputs back to float32. On
    CUDA the run uses IO binding: the input is copied to the device once, the outputs stay on the
    device until one copy back.

    Not thread-safe by design: the batcher calls it from the model's single runner thread.
    """

    def _error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")

    def __init__(
        self,
        model_path: Path,
        *,
        settings: Settings,
        provider: ProviderChoice,
        input_name: str = "input",
        output_name: str = "logits",
        features_name: str | None = None,
        input_dtype: np.dtype | type = np.float32,
        input_shape: tuple[int, ...] | None = None,
        require_provider: bool = False,
        listed_files: Collection[str] | None = None,
        cache: OptimizedModelCache | None = None,
        model_sha256: str = "",
        model_bytes: bytes | None = None,
        threads: int | None = None,
    ) -> None:
        """`input_shape` is the per-image (C, H, W) from metadata.json; `require_provider` makes a
        fallback from the chosen provider an error instead of a warning (device=cuda);
        `listed_files`: see check_external_data. `cache` keeps the optimized graph between starts,
        under a key that includes `model_sha256`, the verified hash of model_path (metadata.json's);
        without both, the graph is optimized here every time. `cache_outcome` says which happened.
        `model_bytes`: a model derived from model_path's (service/engine/precision.py) to run
        instead of the file, never cached. `threads`: intra-op threads instead of the setting's."""
        self.path = Path(model_path)
        self.input_name = input_name
        self.output_name = output_name
        self.features_name = features_name
        self.input_dtype = np.dtype(input_dtype)
        if self.input_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise self._error(f"unsupported input dtype {self.input_dtype} (float32 or float16)")

        self.external_files = check_external_data(self.path, listed_files)
        started = time.perf_counter()
        try:
            self._session, self.cache_outcome = self._open(
                settings, provider, cache, model_sha256, model_bytes, threads
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc
        self.load_s = time.perf_counter() - started

        self.provider: str = self._session.get_providers()[0]
        if self.provider != provider.name:
            message = f"{self.path}: asked for {provider.name} but onnxruntime runs it on {self.provider}"
            if require_provider:
                raise ModelLoadError(message)
            log.warning("%s; serving it on %s", message, self.provider)
        self._cuda = self.provider == CUDA
        self._device_id = provider.device_id or 0

        self.input_shape, self.batch_limit = self._check_input(input_shape)
        self.num_classes = self._check_output(self.output_name, "classes")
        self.features_dim = self._check_output(features_name, "features") if features_name else 0
        self._outputs = [self.output_name, *([features_name] if features_name else [])]
        # Rows every run is zero-padded to (fix_batch_size); None: batches run at their own size.
        self.fixed_batch: int | None = None

    def _open(
        self,
        settings: Settings,
        provider: ProviderChoice,
        cache: OptimizedModelCache | None,
        model_sha256: str,
        model_bytes: bytes | None,
        threads: int | None,
    ) -> tuple[ort.InferenceSession, str]:
        options = session_options(settings)
        if threads is not None:
            options.intra_op_num_threads = threads
        if model_bytes is not None:
            # The cache is keyed by the file's sha256, which does not name a derived model.
            session = ort.InferenceSession(model_bytes, options, providers=provider.session_providers())
            return session, "off (a model converted at load)"
        if cache is not None and model_sha256 and not self.external_files:
            cached = cache.session(self.path, model_sha256, options, provider)
            return cached.session, cached.outcome
        session = ort.InferenceSession(os.fspath(self.path), options, providers=provider.session_providers())
        if cache is None or not model_sha256:
            return session, "off"
        # ORT writes an optimized model's initializers inline unless told to externalize them into
        # one more file, and a model keeps its data outside model.onnx because it is too big to
        # inline (protobuf's 2 GB limit): such models skip the cache rather than add a second,
        # separately hashed file to every entry.
        return session, "skipped (external data)"

    def fix_batch_size(self, rows: int) -> None:
        """Run every batch of up to `rows` images zero-padded to exactly `rows` rows (a larger batch
        is refused). For the CUDA provider, which rebuilds its convolution plans on every change
        of the input shape (Settings.cuda_fixed_batch); the padding rows' outputs are dropped."""
        if rows < 1 or (self.batch_limit is not None and rows > self.batch_limit):
            raise ValueError(f"cannot fix the batch size of {self.path} at {rows}")
        self.fixed_batch = rows

    def _check_input(self, expected: tuple[int, ...] | None) -> tuple[tuple[int, ...], int | None]:
        inputs = {i.name: i for i in self._session.get_inputs()}
        if list(inputs) != [self.input_name]:
            raise self._error(
                f"expected exactly one input named {self.input_name!r}, the model has {list(inputs)}"
            )
        meta = inputs[self.input_name]
        dtype = _ORT_TYPES.get(meta.type)
        if dtype != self.input_dtype:
            raise self._error(
                f"input {self.input_name!r} is {meta.type}, metadata says {self.input_dtype.name}"
            )
        dims = list(meta.shape)
        if len(dims) != 4:
            raise self._error(f"input {self.input_name!r} has shape {dims}, expected [N, C, H, W]")
        model_chw = dims[1:]
        if expected is not None:
            for got, want in zip(model_chw, expected, strict=True):
                if isinstance(got, int) and got != want:
                    raise self._error(
                        f"input shape {dims} does not match metadata [N, {', '.join(map(str, expected))}]"
                    )
            shape = tuple(int(d) for d in expected)
        elif all(isinstance(d, int) for d in model_chw):
            shape = tuple(int(d) for d in model_chw)
        else:
            raise self._error(f"input shape {dims} is not static and no shape was given")
        # Exported models have a dynamic batch dimension; a fixed one caps the batch size.
        batch_limit = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        return shape, batch_limit

    def _check_output(self, name: str, what: str) -> int | None:
        outputs = {o.name: o for o in self._session.get_outputs()}
        if name not in outputs:
            raise self._error(f"no output named {name!r}; it has {list(outputs)}")
        meta = outputs[name]
        if meta.type not in _ORT_TYPES:
            raise self._error(f"output {name!r} is {meta.type}, expected float {what}")
        dims = list(meta.shape)
        if len(dims) != 2:
            raise self._error(f"output {name!r} has shape {dims}, expected [N, {what}]")
        return dims[1] if isinstance(dims[1], int) else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 logits (N, K) for the (N, C, H, W) batch."""
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        rows = x.shape[0]
        if self.fixed_batch is not None and rows != self.fixed_batch:
            if rows > self.fixed_batch:
                raise ModelRunError(f"{self.path}: batch of {rows} over the fixed size {self.fixed_batch}")
            padded = np.zeros((self.fixed_batch, *x.shape[1:]), dtype=x.dtype)
            padded[:rows] = x
            x = padded
        if self._cuda:
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(
                self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", self._device_id)
            )
            for name in self._outputs:
                binding.bind_output(name, "cuda", self._device_id)
            self._session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        else:
            outputs = self._session.run(self._outputs, {self.input_name: x})
        for name, out in zip(self._outputs, outputs, strict=True):
            if out.ndim != 2 or out.shape[0] != x.shape[0]:
                raise ModelRunError(
                    f"{self.path}: returned shape {list(out.shape)} as {name!r} for a batch of {x.shape[0]}"
                )
        # Softmax and clients get float32 even from a float16 model.
        if len(outputs) == 1:
            return np.asarray(outputs[0][:rows], dtype=np.float32)
        return np.concatenate([out[:rows] for out in outputs], axis=1, dtype=np.float32)

    def warmup(self, batch_sizes: Iterable[int]) -> float:
        """Run each batch size once (allocations, CUDA kernels, cuDNN algorithm search happen here,
        not in the first requests). Returns the seconds it took."""
        started = time.perf_counter()
        for n in batch_sizes:
            self.run(np.zeros((n, *self.input_shape), dtype=self.input_dtype))
        return time.perf_counter() - started
