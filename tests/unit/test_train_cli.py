"""`disent train` refuses bad input before any process group starts (exit 2, one clear message)."""
from __future__ import annotations

import pytest

from disent.cli import main
from tests.support.train_helpers import tiny_overrides


@pytest.mark.parametrize("extra,env,message", [
    (["train.global_batch_size=10"], {"WORLD_SIZE": "4"}, "not divisible by world size (4)"),
    (["train.precision=fp16"], {}, "needs a GPU"),
    (["data.url=/nonexistent/data"], {}, "no manifest for split 'train'"),
    (["data.num_classes=7"], {}, "data.num_classes=7 but the data has 4 classes"),
    (["--resume", "/nonexistent/step-00000003"], {}, "--resume"),
    # a run_dir no rank can create (configs/multinode_gpu.yaml's /checkpoints on a node without it)
    (["run_dir=/sys/disent-run"], {}, "config key 'run_dir': run_dir /sys/disent-run cannot be written"),
])
def test_rejected_before_init(tmp_path, tiny_data, monkeypatch, capsys, extra, env, message):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    called = []
    monkeypatch.setattr("disent.train.commands.run_training", lambda *a, **k: called.append(1) or 0)
    replaced = {e.split("=")[0] for e in extra}
    overrides = [o for o in tiny_overrides(tmp_path, tiny_data) if o.split("=")[0] not in replaced]
    rc = main(["train", "configs/base.yaml", *overrides, *extra])
    assert rc == 2 and not called
    assert message in capsys.readouterr().err


def test_valid_input_reaches_training(tmp_path, tiny_data, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    seen = {}
    monkeypatch.setattr("disent.train.commands.run_training", lambda cfg, **kw: seen.update(kw, cfg=cfg) or 75)
    assert main(["train", "configs/base.yaml", *tiny_overrides(tmp_path, tiny_data), "--no-auto-resume"]) == 75
    assert seen["auto_resume"] is False and len(seen["manifest_digest"]) == 64 and seen["cfg"].name == "tiny"


@pytest.mark.parametrize("at_end", [True, False])
def test_eval_at_end_false_skips_only_the_final_evaluation(at_end):
    """eval.at_end: a smoke test or a benchmark ends without the final evaluation; the final checkpoint and the
    exported weights stay."""
    from types import SimpleNamespace

    from disent.config import load_config
    from disent.train.trainer import Trainer

    calls = []
    cfg = load_config("configs/base.yaml", ["name=x", "data.url=d", f"eval.at_end={str(at_end).lower()}",
                                           "tracking.log_model=false"])
    trainer = SimpleNamespace(
        cfg=cfg, step=7, _last_checkpoint_step=7, env=SimpleNamespace(is_main=True), tracker=SimpleNamespace(),
        engines=SimpleNamespace(vae_model=None, disc_model=None), preemption=None,
        run_eval_hooks=lambda step: calls.append(("eval", step)),
        checkpoints=SimpleNamespace(export_final=lambda models, text: calls.append(("export",)) or []))
    Trainer._finish(trainer, exiting=False)
    assert calls == ([("eval", 7)] if at_end else []) + [("export",)]


def test_a_checkpoint_of_another_model_is_refused_in_one_line_naming_the_keys(tmp_path):
    """Resuming (or auto-resuming) a checkpoint whose model.z_dim differs failed with a size mismatch on every rank,
    exit 1, retried; now one input error, before any work."""
    from disent.config import ConfigError, load_config, to_dict
    from disent.train.commands import refuse_another_model

    base = ["name=x", "data.url=d"]
    then = to_dict(load_config("configs/base.yaml", [*base, "model.z_dim=16", "loss.latent_adversarial=1"]))
    same = load_config("configs/base.yaml", [*base, "model.z_dim=16", "loss.latent_adversarial=2", "train.steps=9"])
    refuse_another_model(same, then, "run/checkpoints/step-00000004", automatic=True)  # weights and length may differ
    other = load_config("configs/base.yaml", [*base, "model.z_dim=8", "loss.latent_adversarial=0"])
    with pytest.raises(ConfigError) as info:
        refuse_another_model(other, then, "run/checkpoints/step-00000004", automatic=True)
    message = str(info.value)
    assert "run_dir holds a checkpoint of another model (run/checkpoints/step-00000004: model.z_dim=16 (the config: 8)" \
        in message and "loss.latent_adversarial=1.0 (the config: 0.0)" in message
    assert "train in another run_dir, or set model.z_dim=16 loss.latent_adversarial=1.0 to continue it" in message


@pytest.mark.parametrize("damage, message", [
    ("truncate", "bytes where its manifest says"),
    ("class_counts", "its class_counts"),
    ("num_samples", "but it says num_samples"),
])
def test_local_data_that_is_wrong_is_refused_before_the_run(tmp_path, tiny_data, monkeypatch, capsys, damage, message):
    """A truncated local shard, or a manifest whose counts disagree with its shards: exit 2 before any process group or
    MLflow run (a truncated local shard was exit 69, retried, after the run was created; the counts went unnoticed)."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest_path = data / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncate":
        shard = data / "train" / manifest["shards"][0]["name"]
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "class_counts":
        manifest["class_counts"] = [manifest["class_counts"][0] + 1, *manifest["class_counts"][1:]]
    else:
        manifest["num_samples"] += 5
    manifest_path.write_text(json.dumps(manifest))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    called = []
    monkeypatch.setattr("disent.train.commands.run_training", lambda *a, **k: called.append(1) or 0)
    assert main(["train", "configs/base.yaml", *tiny_overrides(tmp_path / "run", data)]) == 2 and not called
    assert message in capsys.readouterr().err
