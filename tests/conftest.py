"""Shared pytest set-up: import paths, the ``gpu`` marker, a quiet, offline environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for p in (str(TESTS.parent), str(TESTS)):  # `import helpers` and `import train` from any cwd
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("WANDB_MODE", "offline")  # no test ever talks to wandb.ai
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
