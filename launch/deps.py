"""The launcher's dependencies beyond the core install (the ``[train]`` extras), checked before any
work: a missing required one exits with status 2 and one message; a missing optional one (progress
bar, plot) turns its feature off with a note at the start. A run never fails after training.

Standard library only: ``launch/train.py`` calls ``require()`` before importing what needs them.
"""

from __future__ import annotations

import importlib
import sys

HINT = "pip install 'zero-adam[train]'"
REQUIRED = {"pydantic": "the config schema", "yaml": "reading YAML configs", "numpy": "the data loader"}


def importable(module: str) -> bool:
    """Whether ``import module`` works (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install (bad backend, ABI mismatch) is missing too
        return False
    return True


def require() -> None:
    """Exit 2 naming every missing required module, before any process group or model exists."""
    missing = [f"{m} ({why})" for m, why in REQUIRED.items() if not importable(m)]
    if missing:
        print(f"error: launch/train.py needs {', '.join(missing)}, which is not installed: {HINT}",
              file=sys.stderr)
        sys.exit(2)


def optional(feature: str, module: str, setting: str) -> str | None:
    """None if ``module`` imports; else the note that says what is off and how to get it back."""
    if importable(module):
        return None
    return f"note: {module} is not installed, so {feature} is off ({HINT}, or set {setting}=false)"
