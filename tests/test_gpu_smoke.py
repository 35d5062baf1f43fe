"""scripts/gpu_smoke.py, the one-command device check, runs here on the fake accelerator
(``pilm.testing.fake_device``), so every verb it checks on a GPU is checked for tensors and
generators left on the CPU on every machine, and the script does not rot."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"


def test_the_device_check_passes_on_the_fake_accelerator():
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "fakegpu", "--dtypes", "float32"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAIL" not in run.stdout
    last = run.stdout.strip().splitlines()[-1]
    passed, total = last.split(" checks passed")[0].split(" of ")
    assert passed == total and int(total) >= 20, last
