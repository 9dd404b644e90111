"""What the tests share, each written once (imported as `tests.support.<module>`):

* train_helpers: tiny real shards, tiny overrides, torchrun, the shipped configs, and what a run leaves
  behind (complete checkpoints, step directories, metrics.jsonl, "resumed from" lines);
* processes: wait_for (poll until something happens, fail early when the job ends), rank_pids (/proc),
  stop (kill a session the test started);
* launch_helpers: the real trainer's command, a run's checked outcome, a Slurm step's and a pod's environment;
* faultkit: the fault suite's launches and their end, final weights, MLflow runs;
* sources: tiny raw sources for `disent prepare` and small shards for the stream tests;
* k8s: k8s/job.yaml read as Kubernetes does (documents, exit-code policy, strict validation);
* fake_checkpoint: checkpoint parts without DeepSpeed; fake_cuda: CUDA code paths on the CPU build;
* gpu_helpers: the GPU tests' runner and device check;
* servers and clusters: mlflowserver (`mlflow server`), s3server (SeaweedFS, a flaky fake S3),
  slurm_cluster (a one-node Slurm);
* programs run by path: train_worker.py (`disent train` with test hooks, under torchrun), dist_probe.py
  (a stand-in trainer for the launcher).
"""
