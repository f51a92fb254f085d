"""Shared fixtures, kept small and generic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_real_github(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own token must never reach a test: no test may poll a real repository.
    Tests that want the bridge set these to the stand-in server themselves."""
    for name in ("GITHUB_TOKEN", "GITHUB_REPOSITORY", "GITHUB_API_URL", "LAB_ALLOWED_USERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def private_gpu_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU lock is machine-wide: a test must not take (or wait on) a real lane's card."""
    monkeypatch.setenv("LAB_GPU_LOCK_DIR", str(tmp_path / "gpu-lock"))


@pytest.fixture
def tmp_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private LAB_RUNS (and LAB_DB, LAB_ARCHIVE) under tmp_path for one test."""
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("LAB_RUNS", str(runs))
    monkeypatch.setenv("LAB_DB", str(tmp_path / "queue.db"))
    monkeypatch.setenv("LAB_ARCHIVE", str(tmp_path / "archive"))
    return runs


@pytest.fixture
def one_thread() -> Iterator[None]:
    """CPU-heavy tests use one torch thread: the 2 cores are shared by the whole suite."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training run, made once: 5 steps of the tiny refiner (checkpoints, metrics.jsonl,
    config.json, log.txt). Copy it before changing it."""
    import torch

    import config
    from jobs.context import LocalContext
    from models.data import ensure_sample_data
    from models.train import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    cfg = config.preset("tiny", arch="refiner", max_steps=5, eval_interval=5, eval_batches=1)
    train(cfg, ensure_sample_data(root), root / "run", LocalContext(root / "run", echo=lambda s: None))
    return root / "run"
