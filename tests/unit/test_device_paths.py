"""The code that touches devices, run on (fake) CUDA tensors on the CPU build: the objective, the batch
transfer, the metrics window, the gradient norms, evaluation's encoding and the exported weights.

tests/support/fake_cuda.py says what the method catches: an op mixing CPU and CUDA tensors, a host read of a
device value (a sync), a copy from the host, a data-dependent shape. Each test here failed before its fix.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from disent.config import load_config
from disent.models.discriminator import critics_from_config
from disent.models.objective import Objective
from disent.models.vae import vae_from_config
from disent.train.distributed import DistEnv
from tests.support.fake_cuda import CUDA, as_fake, fake_cuda, to_fake_cuda
from tests.support.train_helpers import ROOT, tiny_overrides

EVERY_TERM = ["loss.latent_adversarial=1.0", "loss.class_adversarial=0.5", "loss.class_moments=1.0",
              "loss.reverse_cycle=0.5", "loss.specified_consistency=1.0", "loss.reconstruct_x1_prime=true",
              "loss.reconstruct_x2=true", "loss.class_mmd=1.0", "loss.swap_contrast=1.0", "model.class_channel=true"]
GPU = DistEnv(rank=0, world_size=1, local_rank=0, device_type="cuda")


def config(*overrides: str):
    return load_config(ROOT / "configs" / "fashion_mnist.yaml", list(overrides))


@pytest.mark.parametrize("discriminator", ["pair", "label"])
def test_one_step_of_the_objective_stays_on_the_gpu_without_a_sync_or_a_host_copy(discriminator):
    cfg = config(*EVERY_TERM, f"model.discriminator={discriminator}")
    vae, critics = vae_from_config(cfg), critics_from_config(cfg)
    with fake_cuda() as check:
        to_fake_cuda(vae, check), to_fake_cuda(critics, check)
        x = [torch.rand(8, 1, 28, 28, device=CUDA) for _ in range(4)]
        y1, y2 = torch.randint(0, 10, (8,), device=CUDA), torch.randint(0, 10, (8,), device=CUDA)
        check.uploads.clear()  # the modules' own move
        objective = Objective(cfg.loss, cfg.data.num_classes)
        loss, terms, fakes = objective.vae_losses(vae, critics, *x, y2, step=3, y1=y1)
        d_loss, d_terms = objective.discriminator_losses(critics, x[2], x[3], y2, fakes)
    assert {"latent_adversarial", "class_adversarial", "class_moments", "reverse_cycle", "class_mmd",
            "swap_contrast", "class_code"} <= set(terms)
    assert "latent_critic" in d_terms and "class_moment_gap" in d_terms
    for value in [loss, d_loss, *terms.values(), *d_terms.values()]:
        assert value.device == CUDA and value.dtype == torch.float32
    assert check.syncs == [] and check.uploads == []


def test_the_probe_critics_encoder_loss_and_replay_buffer_stay_on_the_gpu_without_a_sync():
    """Its own fit runs autograd, which fake CUDA cannot (see tests/support/fake_cuda.py); the parts on the VAE's
    path and the buffer's bookkeeping can."""
    from disent.models.probe_critic import ProbeCritic, standardised

    critic = ProbeCritic(4, 10)
    with fake_cuda() as check:
        to_fake_cuda(critic, check)
        check.uploads.clear()
        mu, y = torch.randn(24, 4, device=CUDA), torch.randint(0, 10, (24,), device=CUDA)
        loss = critic.encoder_loss(mu)
        critic._remember(standardised(mu), y)
    assert loss.device == CUDA and loss.dtype == torch.float32 and critic.seen.device == CUDA
    assert check.syncs == [] and check.uploads == []


def test_the_discriminator_losses_are_fp32_on_bf16_logits():
    from disent.models.objective import latent_critic_loss, real_vs_fake_losses

    real, fake = torch.randn(6, 1), torch.randn(12, 1)
    loss, _ = real_vs_fake_losses(real.bfloat16(), fake.bfloat16(), 0.95)
    reference, _ = real_vs_fake_losses(real.bfloat16().float(), fake.bfloat16().float(), 0.95)
    assert loss.dtype == torch.float32 and torch.equal(loss, reference)  # a bf16 target would be 0.949
    critic, _ = latent_critic_loss(torch.randn(8).bfloat16(), 4)
    assert critic.dtype == torch.float32


def test_a_batch_goes_to_the_gpu_once_per_tensor_in_the_training_dtype():
    from disent.train.trainer import Trainer

    batch = {k: torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8) for k in ("x1", "x1p", "x2", "x2p")}
    batch.update(y1=torch.zeros(4, dtype=torch.int64), y2=torch.ones(4, dtype=torch.int64))
    for dtype in (torch.float32, torch.float16):
        trainer = SimpleNamespace(env=GPU, cfg=config("train.channels_last=true"), _compute_dtype=dtype)
        with fake_cuda() as check:
            out = Trainer._to_device(trainer, {k: as_fake(check, v, "cpu") for k, v in batch.items()})
        assert {k: (v.device, v.dtype) for k, v in out.items() if k.startswith("x")} == dict.fromkeys(
            ("x1", "x1p", "x2", "x2p"), (CUDA, dtype))
        assert out["y1"].device == CUDA and len(check.uploads) == 6 and check.syncs == []


class _Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))

    update = report = lambda self, *a: None


def test_the_metrics_window_reduces_gpu_terms_with_host_figures_and_syncs_only_at_its_end(tmp_path):
    """Defect: report() stacked the per-step sums (CUDA) with torch.tensor(data wait) (CPU): every GPU run died at
    its first log window."""
    from disent.train.metrics import TrainingMetrics

    tracker = _Recorder()
    with fake_cuda() as check:
        window = TrainingMetrics(file=tmp_path / "metrics.jsonl", log_every=3, last_step=100, global_batch=64,
                                 reduce_on=CUDA, is_main=True, tracker=tracker, progress=_Recorder(),
                                 loader=SimpleNamespace(wait_seconds=0.25, skipped_shards=0), lrs=lambda: {"lr/vae": 1e-4})
        for step in (1, 2):
            window.record(step, {"vae_loss": torch.rand((), device=CUDA), "swap": torch.rand((), device=CUDA)})
        assert check.syncs == []  # nothing between log windows waits for the GPU
        window.record(3, {"vae_loss": torch.rand((), device=CUDA), "swap": torch.rand((), device=CUDA)})
    [(step, metrics)] = tracker.logged
    assert step == 3 and {"vae_loss", "swap", "data_wait_s", "data_wait_fraction", "samples_per_s"} <= set(metrics)
    assert len(check.syncs) == 4  # one read-back of the stacked window, one value per key


def test_the_zero_0_gradient_norm_stays_a_tensor_on_the_gpu():
    from disent.train.engines import stage0_grad_norm

    with fake_cuda() as check:
        params = [torch.zeros(3, device=CUDA), torch.zeros(2, 2, device=CUDA)]
        for p in params:
            p.grad = torch.ones_like(p)
        engine = SimpleNamespace(zero_optimization_stage=lambda: 0, fp16_enabled=lambda: False,
                                 bfloat16_enabled=lambda: False, module=SimpleNamespace(parameters=lambda: params))
        norm = stage0_grad_norm(engine)
    assert isinstance(norm, torch.Tensor) and norm.device == CUDA and check.syncs == []


def test_evaluation_encodes_on_the_gpu_and_returns_float32_codes_on_the_cpu():
    from disent.eval.evaluate import encode_to_cpu

    cfg = config()
    vae = vae_from_config(cfg)
    images = np.random.default_rng(0).integers(0, 255, (10, 1, 28, 28), dtype=np.uint8)
    with fake_cuda() as check:
        to_fake_cuda(vae, check)
        codes = encode_to_cpu(vae, images, CUDA, batch=4)
    assert {k: (tuple(v.shape), v.device.type, v.dtype) for k, v in codes.items()} == {
        "s": ((10, 16), "cpu", torch.float32), "mu": ((10, 8), "cpu", torch.float32),
        "logvar": ((10, 8), "cpu", torch.float32), "z": ((10, 8), "cpu", torch.float32)}


def test_exported_weights_are_float32_on_the_cpu_whatever_the_training_device_and_precision():
    from disent.checkpoint import cpu_state as _cpu_state

    vae = vae_from_config(config()).half()
    with fake_cuda() as check:
        to_fake_cuda(vae, check)
        state = _cpu_state(vae)
    assert {(v.device.type, v.dtype) for v in state.values() if v.is_floating_point()} == {("cpu", torch.float32)}


# --------------------------------------------------------------------------- evaluation failures and fp16


def test_an_fp16_model_is_evaluated_in_full(tmp_path, tiny_data):
    """Defect: fp16 weights met float32 images, and the dtype error was swallowed, so no evaluation ever ran."""
    from disent.train.hooks import EvaluationHook

    from disent.train.hooks import EvalRequest

    cfg = load_config(ROOT / "configs" / "base.yaml", tiny_overrides(tmp_path, tiny_data))
    vae = vae_from_config(cfg).half()
    tracker = SimpleNamespace(metrics={}, artifacts=[], log_metrics=lambda m, step: tracker.metrics.update(m),
                              log_artifact=lambda path, name: tracker.artifacts.append(name))
    EvaluationHook()(EvalRequest(step=5, models={"vae": vae}, cfg=cfg, device=torch.device("cpu"), rank=0,
                                 out_dir=tmp_path / "eval" / "step-00000005", tracker=tracker))
    assert (tmp_path / "eval" / "step-00000005" / "eval.json").is_file()
    assert "eval/class_from_s_mlp" in tracker.metrics and (tmp_path / "eval/step-00000005/reconstructions.png").is_file()
    assert next(vae.parameters()).dtype == torch.float16  # the trained model itself is left as it was


def test_a_failing_evaluation_is_an_error_line_an_mlflow_tag_and_in_the_result(caplog):
    from disent.train.trainer import Trainer

    def broken(request):
        raise TypeError("Input type (float) and bias type (c10::Half) should be the same")

    tags = {}
    trainer = SimpleNamespace(eval_hooks=[broken], env=DistEnv(), eval_failures=[], cfg=config(),
                              tracker=SimpleNamespace(set_tags=tags.update), eval_request=lambda step: step)
    with caplog.at_level(logging.ERROR):
        Trainer.run_eval_hooks(trainer, 40)
    assert tags == {"eval_failed.step_40": "TypeError: Input type (float) and bias type (c10::Half) should be the same"}
    assert trainer.eval_failures == [f"step 40: {tags['eval_failed.step_40']}"]
    assert any(r.levelno == logging.ERROR and "evaluation at step 40 failed" in r.getMessage() for r in caplog.records)


def test_fake_cuda_catches_what_a_gpu_refuses():
    """The method itself: a CPU scalar stacked with GPU ones, a host read, a host copy."""
    with fake_cuda() as check:
        on_gpu = torch.ones((), device=CUDA)
        with pytest.raises(RuntimeError, match="mixes devices"):
            torch.stack([on_gpu, torch.tensor(1.0)])
        on_gpu.item()
        torch.zeros(3).to(CUDA)
    assert len(check.syncs) == 1 and check.uploads == [(3,)]
    assert (ROOT / "tests" / "support" / "fake_cuda.py").is_file()


def test_the_class_moment_critic_runs_in_half_precision_as_fp16_training_casts_it():
    """fp16 training casts the critics' buffers to half; their running means are updated in that dtype and the
    leakage is taken in fp32."""
    from disent.models.discriminator import ClassMomentCritic

    critic = ClassMomentCritic(4, 3).half()
    code, labels = torch.randn(12, 4).half(), torch.tensor([0, 1, 2] * 4)
    critic.update(code, labels)
    assert critic.centroids.dtype == torch.float16 and critic.centroids.abs().sum() > 0
    assert critic.leakage(code, labels).dtype == torch.float32 and torch.isfinite(critic.gap())
