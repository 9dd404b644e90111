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
    plan = seen["plan"]
    assert seen["auto_resume"] is False and len(plan.manifest.digest) == 64 and seen["cfg"].name == "tiny"
    assert plan.world_size == 1 and plan.env.device_type == "cpu" and plan.micro_batch == 8 // plan.grad_accum
    assert set(plan.deepspeed) == {"vae", "disc"} and all(
        c["train_micro_batch_size_per_gpu"] == plan.micro_batch for c in plan.deepspeed.values())


def test_the_preflight_decides_each_setting_once(tmp_path, tiny_data, monkeypatch):
    """The world size, the device, the micro batch, each DeepSpeed config and the manifest are derived once per run,
    in the preflight's plan, and handed on; nothing after it derives them again (next test)."""
    import disent.data.reading as reading
    import disent.train.ds_config as ds_config
    import disent.train.plan as plan_module

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def counted(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    for module, name in ((plan_module, "detect_env"), (plan_module, "choose_device"), (plan_module, "micro_batch_size"),
                         (ds_config, "micro_batch_size"), (ds_config, "deepspeed_config"), (reading, "open_split"),
                         (reading, "read_manifest")):
        counted(module, name)
    seen = {}
    monkeypatch.setattr("disent.train.commands.run_training", lambda cfg, **kw: seen.update(kw) or 0)
    assert main(["train", "configs/base.yaml", *tiny_overrides(tmp_path, tiny_data)]) == 0
    assert sorted(calls) == sorted(["detect_env", "choose_device", "micro_batch_size", "deepspeed_config",
                                    "deepspeed_config", "open_split", "read_manifest"])
    assert isinstance(seen["plan"], plan_module.RunPlan)


def test_the_trainer_takes_its_settings_from_the_plan(tmp_path, tiny_data, monkeypatch):
    """Given a plan, the trainer builds its engines and its loader from it: it chooses no device, reads no
    environment or manifest and splits no batch of its own."""
    import ast
    import importlib
    import inspect
    from types import SimpleNamespace

    import disent.train.trainer as trainer_module
    from disent.config import load_config
    from disent.train.plan import build_plan

    cfg = load_config("configs/base.yaml", tiny_overrides(tmp_path, tiny_data))
    plan = build_plan(cfg)

    def refused(*args, **kwargs):
        raise AssertionError("derived again after the plan")

    for name in ("disent.config.checks.micro_batch_size", "disent.train.ds_config.deepspeed_config",
                 "disent.train.distributed.detect_env", "disent.train.distributed.choose_device",
                 "disent.data.reading.open_split", "disent.data.reading.read_manifest"):
        monkeypatch.setattr(name, refused)
    built, loaders = [], []
    monkeypatch.setattr(trainer_module, "build_engines", lambda c, p: built.append(p) or SimpleNamespace())
    monkeypatch.setattr(trainer_module, "apply_determinism", lambda setting, device_type: False)
    trainer = trainer_module.Trainer(cfg, plan, loader_factory=lambda *a, **k: loaders.append((a, k)) or [],
                                     tracker=SimpleNamespace(), eval_hooks=[])
    assert built == [plan] and trainer.env is plan.env
    assert loaders == [((cfg.data, cfg.data.train_split, plan.micro_batch, 0, 1, cfg.seed),
                        {"manifest": plan.manifest})]
    derived = {"micro_batch_size", "deepspeed_config", "detect_env", "choose_device", "open_split", "read_manifest",
               "check_manifest"}
    for module in ("disent.train.trainer", "disent.train.engines"):  # nor anywhere a later change might put it
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & derived, (module, names & derived)


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
