"""Environment-aware process launch for disent (local, torchrun, Slurm, Kubernetes)."""
