"""Issue 18, item 6: `scripts/setup.sh` shows what it is doing; pip is not silenced for its minutes of downloads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_script_shows_pip_progress_and_its_steps(tmp_path):
    """setup.sh, run with a stand-in python3 whose venv's pip records its arguments: pip is not made quiet, shows
    its progress bar, and each step is announced."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "pip.log"
    (fake / "python3").write_text(
        "#!/bin/sh\n"  # `python3 -m venv .venv`: a venv whose python logs each call
        "mkdir -p .venv/bin\n"
        f"printf '#!/bin/sh\\necho \"$*\" >> {log}\\n' > .venv/bin/python\n"
        "chmod +x .venv/bin/python\n"
    )
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    run = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(call.startswith("-m pip install") for call in calls), calls
    for call in calls:
        assert "--quiet" not in call.split() and "-q" not in call.split() and "--progress-bar on" in call, call
    assert [line[:15] for line in run.stdout.splitlines()[:3]] == ["setup.sh [1/3] ", "setup.sh [2/3] ",
                                                                   "setup.sh [3/3] "]
