"""The import contracts in pyproject.toml's [tool.importlinter] hold: one-way package layers, no module cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    # lint-imports is installed next to the interpreter running the tests (the project's virtualenv).
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"import contracts broken:\n{result.stdout}{result.stderr}"
