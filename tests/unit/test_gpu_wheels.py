"""`make gpu-wheels` (benchmarks/gpu_wheels.py): what the lent GPU machine lacks, and nothing it has. The download
itself needs a registry and is measured by hand (docs/benchmarks.md); these check the choices it rests on."""
from __future__ import annotations

import sys
import zipfile

from tests.support.train_helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels  # noqa: E402


def test_the_machine_has_torch_and_lacks_what_the_check_carries():
    have = gpu_wheels.present()
    assert {"torch", "numpy", "pyyaml", "pillow", "scikit-learn", "pytest", "pytest-timeout", "psutil"} <= have
    assert not {"deepspeed", "mlflow", "mlflow-skinny", "webdataset", "boto3", "botocore", "sqlalchemy"} & have
    assert gpu_wheels.normalised("Typing_Extensions") == "typing-extensions"


def test_deepspeeds_requirements_travel_without_torch(tmp_path):
    wheel = tmp_path / "deepspeed-0.19.8-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("deepspeed-0.19.8.dist-info/METADATA", "\n".join([
            "Name: deepspeed", "Requires-Dist: einops", "Requires-Dist: hjson", "Requires-Dist: torch",
            "Requires-Dist: torch>=2.1", "Requires-Dist: pydantic>=2.0.0", "Requires-Dist: triton; extra == 'sd'"]))
    assert gpu_wheels.requirements_but_torch(wheel) == ["einops", "hjson", "pydantic>=2.0.0"]


def test_the_check_installs_from_the_wheels_without_an_index_and_holds_torch():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "--no-index --find-links \"$ROOT/.whl\" -c \"$OUT/constraints.txt\"" in script
    assert "print('torch==' + torch.__version__.split('+')[0])" in script
    assert script.index("# 5. the benchmark first") < script.index("# 6. the GPU tests")
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
