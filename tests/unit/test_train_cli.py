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
