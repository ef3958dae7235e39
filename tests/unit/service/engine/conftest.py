"""The `repo` fixture (linear_repo: a repository of linear ONNX models) for this room's tests."""

from linear_repo import repo  # noqa: F401 - a fixture, found by pytest here
