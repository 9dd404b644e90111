"""Integration tests: they start processes (the CLI, torchrun, the launcher, scripts) or servers (S3, MLflow,
Slurm); each is marked `slow` by conftest.py."""
