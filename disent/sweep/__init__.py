"""Sweeps: one config over many values (`disent sweep`), tracked as an MLflow parent run with a child
run per point. points: expanding and checking the points; backends: running them here, as a Slurm
job array or as Kubernetes Indexed Jobs; summary: the parent run and its summary table and plot."""
