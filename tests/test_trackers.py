"""report_to="tensorboard": the training events become TensorBoard scalars under run_dir/tensorboard."""

from __future__ import annotations

import logging
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agentkiln.training.trackers import TENSORBOARD_DIR, WANDB_DIR, build_trackers, with_trackers

STEP_METRICS = ("train_reward", "val_reward", "loss", "kl", "clip_frac", "tokens_per_s", "sample_s", "learn_s")


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_step_events_become_tensorboard_scalars(tmp_path):
    (tracker,) = build_trackers("tensorboard", tmp_path)
    seen = []
    handle = with_trackers(lambda kind, data: seen.append(kind), [tracker])
    handle("validation", {"tag": "before", "reward": 0.25, "n": 4})
    for step in (1, 2):
        record = {m: step / 10 for m in STEP_METRICS}
        handle("step", {"step": step, **record, "agents": {"solver": {"loss": 1.5}}, "note": "text is skipped"})
    tracker.close()
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    for metric in STEP_METRICS:
        assert [s for s, _ in scalars[f"train/{metric}"]][-2:] == [1, 2], metric
    assert scalars["train/val_reward"][0] == (0, 0.25)
    assert scalars["train/agents/solver/loss"] == [(1, 1.5), (2, 1.5)]
    assert seen == ["validation", "step", "step"]  # the caller's own handler still runs


def test_none_and_unknown_reporters(tmp_path):
    assert build_trackers("none", tmp_path) == [] and build_trackers(None, tmp_path) == []
    with pytest.raises(ValueError, match="report_to"):
        build_trackers("wandb-online", tmp_path)


def test_a_failing_tracker_does_not_stop_training(caplog):
    class Broken:
        def on_event(self, kind, data):
            raise OSError("disk full")

        def close(self):
            pass

    seen = []
    with caplog.at_level(logging.ERROR):
        with_trackers(lambda k, d: seen.append(k), [Broken()])("step", {"step": 1})
    assert seen == ["step"] and "Broken failed" in caplog.text


def test_wandb_offline_run_holds_the_step_metrics(tmp_path, monkeypatch):
    """report_to="wandb": an offline W&B run under run_dir/wandb (nothing is uploaded) with every step's metrics."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tracker,) = build_trackers("wandb", tmp_path / "demo")
    with_trackers(None, [tracker])("validation", {"tag": "before", "reward": 0.25, "n": 4})
    for step in (1, 2):
        with_trackers(None, [tracker])("step", {"step": step, **{m: step / 10 for m in STEP_METRICS}})
    tracker.close()
    (run_file,) = (tmp_path / "demo" / WANDB_DIR).glob("offline-run-*/run-*.wandb")
    keys = [f"train/{metric}".encode() for metric in STEP_METRICS]
    # The run's records (protobuf) are written by wandb's own service process, which may still be
    # flushing them when finish() returns on a loaded machine (a CI run once read the bare header).
    deadline = time.monotonic() + 30
    while not all(key in (data := run_file.read_bytes()) for key in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    for metric, key in zip(STEP_METRICS, keys):
        assert key in data, metric
