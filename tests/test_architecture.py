"""The layers of docs/ARCHITECTURE.md hold: import-linter's contracts (pyproject.toml) are kept."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_engine_module_is_over_400_lines() -> None:
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / "cbd_engine").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
