"""Environment-aware process launch for disent (local, torchrun, Slurm, Kubernetes)."""

# `launcher` is a generic top-level name another distribution may install too, and pip then overwrites the
# shared files without a warning. This line is how `disent` (which reads it, never imports the launcher) and
# `python -m launcher` tell that the package found is this one: docs/launch.md, "The name `launcher`".
DISTRIBUTION = "disent-adversarial"
