"""A plain `pip install .` has no numpy (it comes only with the test extra): nothing at run time may need it."""

import subprocess
import sys

import pytest

_WITHOUT_NUMPY = """
import sys
sys.modules["numpy"] = None  # `import numpy` now fails, and torch runs as it does without numpy installed
import torch
from qwen3next.cli.main import main
from qwen3next.weights import CheckpointReader, write_checkpoint

src, out, written = sys.argv[1:]
tensors = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
write_checkpoint(written, tensors.items())
with CheckpointReader(written) as reader:
    assert all(torch.equal(reader.read(name), t) for name, t in tensors.items())
for argv in (["run", "-m", src, "-p", "The river", "-n", "3", "-q"], ["quantize", src, out, "--bits", "4", "-q"],
             ["run", "-m", out, "-p", "The river", "-n", "3", "-q"], ["inspect", out, "-q"]):
    code = main(argv)
    assert code == 0, (argv, code)
"""


@pytest.mark.slow
def test_runs_without_numpy(models, tmp_path):
    done = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY, str(models("tiny")), str(tmp_path / "q4"),
                           str(tmp_path / "written")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Numpy is not available" not in done.stderr
