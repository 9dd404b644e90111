"""Wheels for the lent GPU machine, which reaches no package registry: `make gpu-wheels` runs this here.

The machine has Python 3.12, torch (CUDA) and the scientific stack (benchmarks/gpu_machine_packages.txt, read off
the device tool's KINDS.md); it lacks deepspeed, mlflow, webdataset and boto3. This downloads, for CPython 3.12
manylinux x86_64, what the project needs and that list does not hold, with their own missing dependencies, into
.whl/ (ignored by git; carried to the machine by the device tool), builds DeepSpeed as a pure-Python wheel with no
ops (DS_BUILD_OPS=0), and checks that the tree and the wheels stay under the limit of what a call carries.

MLflow travels as mlflow-skinny with SQLAlchemy and Alembic, which give its tracking client and the sqlite:///
store; full mlflow (its server and UI) does not fit, so the check starts no MLflow server. S3 (boto3) travels.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESENT = ROOT / "benchmarks" / "gpu_machine_packages.txt"
DEEPSPEED = "deepspeed==0.19.8"
# What the GPU check imports beyond the machine's own packages (pyproject's dependencies, mlflow as skinny).
# MLflow as mlflow-skinny with SQLAlchemy and Alembic: its tracking client and the sqlite:/// store (full mlflow,
# with its server and UI, does not fit).
NEEDED = ["mlflow-skinny>=3,<4", "sqlalchemy>=2", "alembic", "webdataset>=0.2.90,<2", "boto3>=1.44"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64", "--platform", "any", "--only-binary=:all:"]
LIMIT_MIB = 60


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def present() -> set[str]:
    return {normalised(line.split("#")[0].strip()) for line in PRESENT.read_text().splitlines() if line.split("#")[0].strip()}


def distribution(wheel: Path) -> str:
    return normalised(wheel.name.split("-")[0])


def requirements_but_torch(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist, torch left out."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    needs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [n for n in needs if ";" not in n and normalised(re.split(r"[<>=!~ \[]", n)[0]) != "torch"]


def tree_bytes() -> int:
    """What a device call carries besides .whl/: the tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    have = present()
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        everything = Path(tmp) / "all"
        # DeepSpeed is an sdist: built here with no ops (pure Python) against this environment's torch.
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(everything), DEEPSPEED],
                       check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        deepspeed_wheel = next(everything.glob("deepspeed-*.whl"))
        if not deepspeed_wheel.name.endswith("py3-none-any.whl"):
            print(f"gpu-wheels: {deepspeed_wheel.name} is not a pure-Python wheel", file=sys.stderr)
            return 1
        # DeepSpeed's own requirements but torch (and the CUDA wheels torch would pull in): the machine's torch stays.
        subprocess.run([*pip, "download", "-q", *TARGET, "-d", str(everything),
                        *NEEDED, *requirements_but_torch(deepspeed_wheel)], check=True)
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        kept = [w for w in sorted(everything.glob("*.whl")) if distribution(w) not in have]
        for wheel in kept:
            shutil.copy2(wheel, args.out / wheel.name)
    wheels = sum(w.stat().st_size for w in args.out.glob("*.whl"))
    tree = tree_bytes()
    for wheel in sorted(args.out.glob("*.whl"), key=lambda w: -w.stat().st_size):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    total = (wheels + tree) / 2**20
    print(f"gpu-wheels: {len(kept)} wheels {wheels / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB) in {args.out}")
    if total > LIMIT_MIB:
        print(f"gpu-wheels: over the {LIMIT_MIB} MiB a device call may carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
