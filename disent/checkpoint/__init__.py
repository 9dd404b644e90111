"""Atomic, multi-rank checkpoints with auto-resume, pruning and an optional copy to s3://.

This package is the only code that knows the on-disk layout (layout.py: every path under run_dir). The trainer hands
:meth:`CheckpointManager.save` a dict of stateful parts (each DeepSpeed engine, the data loader,
the trainer's own step and RNG) and gets them back, loaded in place, from
:meth:`CheckpointManager.load`; evaluation, `disent swap`, the demo and the final-weights export
read and write through :class:`CheckpointInfo` and :meth:`CheckpointManager.export_final`.

Layout::

    run_dir/checkpoints/step-00000123/
        vae/                    a DeepSpeed engine part: its own checkpoint (every rank writes its share)
        disc/                   the other engine
        trainer-rank{r}.pt      per rank: {part name: state_dict()} of every other part (trainer, loader)
        meta.json               rank 0: step, MLflow run id, resolved config, world size
        vae_weights.pt          rank 0: the bare VAE's state_dict, for eval/swap (weights_only loading)
        eval/                   `disent eval` of this checkpoint: eval.json and its PNG grids
        COMPLETE                written last, by rank 0, after every rank has finished
    run_dir/final/{vae,disc}.pt the bare models' weights at the end of a finished run
    run_dir/.universal/         transient: ZeRO 1/2 engine states converted while resuming on another
                                number of ranks (needs run_dir on a filesystem every node sees)

Its parts: layout.py (paths, CheckpointInfo), files.py (atomic writes), safe_load.py (weights_only
loading), reshard.py (engines on another number of ranks), upload.py (copies to s3://), manager.py
(CheckpointManager: save, find, load, prune, export).

A part is an engine when it has both of DeepSpeed's ``save_checkpoint`` and ``load_checkpoint``; any other part
needs ``state_dict()``/``load_state_dict()`` returning tensors and plain values. Adding a part to
the dict the trainer passes is all a new checkpoint field takes (checkpoints written before it are
refused, naming it).

A checkpoint counts only once COMPLETE exists, so a crash during a save leaves the previous one
in force. Our own files are written to a temporary name, fsynced and renamed.

Every file of a checkpoint, DeepSpeed's included, is unpickled with ``torch.load(weights_only=True)``
(DeepSpeed 0.19.8 itself unpickles without that restriction; its engines' loads are routed through
:func:`safe_torch_load` while we resume), so a tampered checkpoint cannot run code.

Test-only fault injection: ``DISENT_FAULT_CHECKPOINT_KILL=RANK:STEP`` makes that rank SIGKILL itself
while checkpoint STEP is being written (after its DeepSpeed files, before its trainer file and the
COMPLETE barrier), once per run_dir. It exists for tests/faults/ and does nothing when unset.
"""
from disent.checkpoint.files import atomic_torch_save, cpu_state, export_models
from disent.checkpoint.layout import COMPLETE, EXPORTED_FILES, CheckpointError, CheckpointInfo, RunLayout, step_dir_name
from disent.checkpoint.manager import CheckpointManager
from disent.checkpoint.safe_load import safe_torch_load

__all__ = ["COMPLETE", "EXPORTED_FILES", "CheckpointError", "CheckpointInfo", "CheckpointManager", "RunLayout",
           "atomic_torch_save", "cpu_state", "export_models", "safe_torch_load", "step_dir_name"]
