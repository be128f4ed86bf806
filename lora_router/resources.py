"""Files the project ships beside its code (configs/: deployments and training recipes), found the same way from a
source checkout and from an installed wheel, which carries a copy of configs/ as lora_router/configs."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE.parent
PACKAGED_CONFIGS = PACKAGE / "configs"


def configs_dir() -> Path:
    """The checkout's configs/ when running from one, else the wheel's copy."""
    checkout = _CHECKOUT / "configs"
    return checkout if (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir() else PACKAGED_CONFIGS


def is_packaged(path: Path) -> bool:
    """Whether `path` is a file of the wheel's configs copy (read-only defaults, no project of their own)."""
    return path.resolve().is_relative_to(PACKAGED_CONFIGS)
