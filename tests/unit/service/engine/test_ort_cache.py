"""The ONNX Runtime graph cache (service/engine/ort_cache.py): a miss writes an entry that the next
session opens instead of optimizing model.onnx again, a different key never reuses it, an unusable
directory or a corrupt entry costs only the cache, and the answers are the same either way."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from linear_repo import settings_for
from test_model_integrity import external_model
from test_session import CHW, CPU_CHOICE, SETTINGS, linear_model, reference, save

from export.repository import sha256_file
from service.engine import ort_cache
from service.engine.engine import ClassificationEngine
from service.engine.ort_cache import OptimizedModelCache, cache_key
from service.engine.providers import CPU, CUDA, ProviderChoice
from service.engine.session import ModelSession, session_options
from service.settings import Settings

X = np.random.default_rng(7).standard_normal((3, *CHW)).astype(np.float32)


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    onnx_model, w, b = linear_model()
    return save(onnx_model, tmp_path / "repo" / "m" / "1"), w, b


@pytest.fixture
def cache(tmp_path: Path) -> OptimizedModelCache:
    opened = OptimizedModelCache.open(tmp_path / "cache")
    assert opened is not None
    return opened


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the cache asks ONNX Runtime to open, in order."""
    paths: list[Path] = []
    create = ort_cache._create

    def spy(path: Path, *args: Any) -> ort.InferenceSession:
        paths.append(Path(path))
        return create(path, *args)

    monkeypatch.setattr(ort_cache, "_create", spy)
    return paths


def session(
    path: Path, cache: OptimizedModelCache | None, settings: Settings = SETTINGS, **kw: Any
) -> ModelSession:
    return ModelSession(
        path, settings=settings, provider=kw.pop("provider", CPU_CHOICE), input_shape=CHW, cache=cache,
        model_sha256=sha256_file(path), **kw,
    )  # fmt: skip


def entries(cache: OptimizedModelCache) -> list[Path]:
    return sorted(p for p in cache.directory.iterdir() if not p.name.startswith("."))


def test_a_miss_writes_an_entry_and_the_next_session_opens_it_instead_of_model_onnx(
    model: tuple[Path, np.ndarray, np.ndarray], cache: OptimizedModelCache, opened: list[Path]
) -> None:
    path, w, b = model
    repo_files = sorted(path.parent.iterdir())
    first = session(path, cache)
    assert first.cache_outcome == "miss (written)"
    assert opened == [path]
    record, entry = entries(cache)
    assert (record.suffix, entry.suffix) == (".json", ".onnx")
    before = entry.stat()

    opened.clear()
    second = session(path, cache)
    assert second.cache_outcome == "hit"
    assert opened == [entry]  # model.onnx was not optimized again
    after = entry.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # read, not rewritten
    # The same answers as without a cache, and as the math.
    plain = session(path, None)
    assert plain.cache_outcome == "off"
    np.testing.assert_allclose(second.run(X), plain.run(X), rtol=0, atol=1e-5)
    np.testing.assert_allclose(first.run(X), plain.run(X), rtol=0, atol=1e-5)
    np.testing.assert_allclose(second.run(X), reference(X, w, b), rtol=1e-4, atol=1e-4)
    assert sorted(path.parent.iterdir()) == repo_files  # nothing written into the repository


def test_another_optimization_level_misses_and_keeps_its_own_entry(
    model: tuple[Path, np.ndarray, np.ndarray], cache: OptimizedModelCache
) -> None:
    path, _, _ = model
    assert session(path, cache).cache_outcome == "miss (written)"
    basic = Settings(device="cpu", intra_op_threads=1, graph_optimization_level="basic")
    assert session(path, cache, basic).cache_outcome == "miss (written)"
    assert len(entries(cache)) == 4
    assert session(path, cache, basic).cache_outcome == "hit"
    assert session(path, cache).cache_outcome == "hit"


@pytest.mark.parametrize(
    "change",
    ["model", "onnxruntime", "provider options", "provider", "hardware", "optimization level"],
)
def test_everything_that_shapes_the_graph_is_in_the_key(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    cuda = ProviderChoice(
        CUDA, options={"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}, device_id=0
    )
    base = {"sha": "a" * 64, "settings": SETTINGS, "provider": cuda}
    key = cache_key(base["sha"], session_options(SETTINGS), cuda)
    # What does not shape the graph shares the entry (bench and serve use other thread counts).
    threads = Settings(device="cpu", intra_op_threads=3, intra_op_spinning=True)
    assert cache_key(base["sha"], session_options(threads), cuda) == key
    changed = dict(base)
    if change == "model":
        changed["sha"] = "b" * 64
    elif change == "onnxruntime":
        monkeypatch.setattr(ort_cache.ort, "__version__", "0.0.1")
    elif change == "provider options":
        changed["provider"] = ProviderChoice(
            CUDA, options={"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
        )
    elif change == "provider":
        changed["provider"] = CPU_CHOICE
    elif change == "hardware":
        monkeypatch.setattr(ort_cache, "hardware_fingerprint", lambda: "x86_64 sse2")
    else:
        changed["settings"] = Settings(device="cpu", intra_op_threads=1, graph_optimization_level="extended")
    other = cache_key(changed["sha"], session_options(changed["settings"]), changed["provider"])
    assert ort_cache.key_digest(other) != ort_cache.key_digest(key)


def test_a_graph_optimized_on_a_fallback_provider_is_not_stored(
    model: tuple[Path, np.ndarray, np.ndarray], cache: OptimizedModelCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = model
    asked = ProviderChoice(CUDA, options={"device_id": "0"}, device_id=0)
    monkeypatch.setattr(ProviderChoice, "session_providers", lambda self: [CPU])  # CUDA "broke"
    sess = session(path, cache, provider=asked)
    assert sess.provider == CPU
    assert sess.cache_outcome == "miss (not written: fell back to CPUExecutionProvider)"
    assert entries(cache) == []


def _under_a_file(root: Path) -> Path:
    (root / "file").write_text("")
    return root / "file" / "ort"


def _group_writable(root: Path) -> Path:
    (root / "gw").mkdir(mode=0o775)
    (root / "gw").chmod(0o775)
    return root / "gw"


def _someone_elses(root: Path) -> Path:
    (root / "theirs").mkdir(mode=0o700)
    os.chown(root / "theirs", os.geteuid() + 1, -1)
    return root / "theirs"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_under_a_file, "cannot be created or written"),
        (_group_writable, "writable by group or others"),
        (_someone_elses, "is owned by uid"),
        (lambda root: root / "ro", "Read-only file system"),
    ],
    ids=["under-a-file", "group-writable", "another-uid", "read-only"],
)
def test_an_unusable_directory_skips_the_cache_and_the_model_still_serves(
    tmp_path: Path,
    model: tuple[Path, np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make: Any,
    why: str,
) -> None:
    if why == "is owned by uid" and os.geteuid() != 0:
        pytest.skip("only root can give a directory to another uid")
    directory = make(tmp_path)
    if why == "Read-only file system":
        # Tests run as root, which permissions do not stop: fail the write the way a read-only
        # mount does, where the probe really writes.
        def read_only(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(ort_cache.tempfile, "mkstemp", read_only)
    with caplog.at_level(logging.WARNING, logger="service.engine.ort_cache"):
        assert OptimizedModelCache.open(directory) is None
    assert "graph cache skipped" in caplog.text and why in caplog.text
    path, w, b = model
    sess = session(path, None)
    np.testing.assert_allclose(sess.run(X), reference(X, w, b), rtol=1e-4, atol=1e-4)


def _truncate(entry: Path, record: Path) -> None:
    entry.write_bytes(entry.read_bytes()[:100])


def _scramble(entry: Path, record: Path) -> None:
    entry.write_bytes(bytes(entry.stat().st_size))  # same size, not a model


def _garble_record(entry: Path, record: Path) -> None:
    record.write_text("{not json")


def _group_writable_entry(entry: Path, record: Path) -> None:
    entry.chmod(0o664)


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (_truncate, "bytes, its record says"),
        (_scramble, "onnxruntime cannot open it"),
        (_garble_record, "unreadable record"),
        (_group_writable_entry, "writable by group or others"),
    ],
    ids=["truncated", "not-a-model", "bad-record", "group-writable"],
)
def test_a_corrupt_entry_falls_back_to_model_onnx_and_is_rewritten(
    model: tuple[Path, np.ndarray, np.ndarray],
    cache: OptimizedModelCache,
    caplog: pytest.LogCaptureFixture,
    corrupt: Any,
    why: str,
) -> None:
    path, w, b = model
    session(path, cache)
    record, entry = entries(cache)
    corrupt(entry, record)
    with caplog.at_level(logging.WARNING, logger="service.engine.ort_cache"):
        rebuilt = session(path, cache)
    assert rebuilt.cache_outcome == "miss (written)"
    assert "unusable" in caplog.text and why in caplog.text
    np.testing.assert_allclose(rebuilt.run(X), reference(X, w, b), rtol=1e-4, atol=1e-4)
    assert session(path, cache).cache_outcome == "hit"


def test_models_with_external_data_skip_the_cache(tmp_path: Path, cache: OptimizedModelCache) -> None:
    path, w, b = external_model(tmp_path / "m" / "1")
    sess = session(path, cache, listed_files={"model.onnx", "weights.bin"})
    assert sess.cache_outcome == "skipped (external data)"
    assert entries(cache) == []
    np.testing.assert_allclose(sess.run(X), reference(X, w, b), rtol=1e-4, atol=1e-4)


def test_the_loaded_line_says_whether_the_cache_hit(
    repo: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(
        repo["root"], models="rgb:1", ort_cache_dir=str(tmp_path / "ort"), warmup_batch_sizes="1"
    )
    repo_files = sorted(repo["root"].rglob("*"))
    for outcome in ("miss (written)", "hit"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            ClassificationEngine(settings).load()
        assert f"ONNX Runtime graph cache {outcome};" in caplog.text
    assert sorted(repo["root"].rglob("*")) == repo_files  # the repository stays read-only


def test_the_cache_is_off_by_default_and_empty_means_the_xdg_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CNNSERVE_ORT_CACHE_DIR", raising=False)
    assert Settings().ort_cache_path is None
    assert Settings().ort_cache_off_reason == "ort_cache_dir=none"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Settings(ort_cache_dir="").ort_cache_path == tmp_path / "xdg" / "cnnserve" / "ort"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings(ort_cache_dir="").ort_cache_path == tmp_path / "home" / ".cache" / "cnnserve" / "ort"
    assert Settings(ort_cache_dir=" None ").ort_cache_path is None
    assert Settings(ort_cache_dir=str(tmp_path / "c")).ort_cache_path == tmp_path / "c"
