"""scripts/gpu_smoke.py runs (on the CPU here), so the GPU check does not rot."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"


def test_the_gpu_smoke_script_passes_on_the_cpu():
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed on cpu" in run.stdout and "FAIL" not in run.stdout
