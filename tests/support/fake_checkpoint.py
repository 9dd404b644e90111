"""CheckpointManager's parts without DeepSpeed: an engine that saves one value (or fails like a full disk),
a stateful part, and `save(mgr, step)`, a complete checkpoint of them at `step`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from disent.train.rng import rng_state


class FakeEngine:
    def __init__(self, value=0.0, fail=False):
        self.value = value
        self.fail = fail
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        assert save_latest is False
        if self.fail:
            raise OSError("disk full")
        (Path(save_dir) / tag).mkdir(parents=True)
        torch.save({"value": self.value}, Path(save_dir) / tag / "model.pt")

    def load_checkpoint(self, load_dir, tag):
        self.loaded = torch.load(Path(load_dir) / tag / "model.pt", weights_only=True)["value"]
        return str(Path(load_dir) / tag), {}


class FakeStateful:
    def __init__(self, state=None):
        self.state = state
        self.loaded = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def fake_parts(fail_disc=False):
    return {"vae": FakeEngine(1.0), "disc": FakeEngine(2.0, fail=fail_disc), "trainer": FakeStateful()}


def save(mgr, step, parts=None):
    parts = parts or fake_parts()
    parts["trainer"].state = {"step": step, "loader_json": json.dumps({"epoch": 0, "batch": step}), "rng": rng_state()}
    vae = torch.nn.Linear(2, 1)  # the bare VAE: rank 0 saves its weights (vae_weights.pt)
    return mgr.save(step, parts, {"mlflow_run_id": "abc", "config": {"name": "t"}}, vae)
