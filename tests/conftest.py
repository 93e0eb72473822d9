"""Shared fixtures: one small synthetic competition, built once per test session.

`synth_comp` is a `Path` to a competition in Kaggle's 2021 layout written by
`pipeline.acquire.synth.make_competition` (6 landmarks × 8 photos, 64 px, 30 test images of which
9 are distractors, with `solution.csv` and `synth.json`). Treat it as read-only: copy it
(`shutil.copytree`) before changing anything in it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the checkout first, so tests run against this tree even without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTH_COMP_ARGS = dict(seed=0, landmarks=6, per_landmark=8, test=30, distractor_frac=0.3, size=64)


@pytest.fixture(scope="session")
def synth_comp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic competition (read-only): see the module docstring for its shape."""
    from pipeline.acquire.synth import make_competition

    root = tmp_path_factory.mktemp("synth") / "comp"
    make_competition(root, **SYNTH_COMP_ARGS)
    return root
