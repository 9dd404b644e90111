"""The metadata is in pyproject.toml; this file only adds one build step.

slurm/train.sh and k8s/job.yaml stay at the top of the repository (where `sbatch slurm/train.sh` and the
docs expect them), yet `disent sweep --backend slurm|k8s` must find them in an installed wheel too. A
symlink inside disent/ would break the image build (Dockerfile copies disent/ without slurm/ and k8s/), so
the wheel gets copies made here at build time: the files at the top stay the one source.
disent.sweep.backends.template() looks for the copy first and falls back to the checkout (an editable
install builds nothing)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
TEMPLATES = ("slurm/train.sh", "k8s/job.yaml")  # relative to HERE and to disent/sweep/templates/ in the wheel


class BuildPyWithTemplates(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for relative in TEMPLATES:
            source = HERE / relative
            if not source.is_file():
                # The image build copies disent/ alone (it never sweeps); the command names what is missing.
                self.warn(f"{relative} not found: this build ships no {relative} for `disent sweep`")
                continue
            target = Path(self.build_lib, "disent", "sweep", "templates", relative)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithTemplates})
