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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny `glr run` (synthetic competition, one vgg16, 1 epoch): `root/run`, `root/comp`,
    `root/glr.toml`. One per test module: some modules run `glr run` there again with more stages."""
    from pipeline.acquire.synth import make_competition
    from tests.run.test_stages import TINY, glr

    root = tmp_path_factory.mktemp("finished")
    make_competition(root / "comp", landmarks=4, per_landmark=8, test=12, size=64, seed=0)
    (root / "glr.toml").write_text(TINY.format(epochs=1, trials=2))
    res = glr("run", "glr.toml", "-q", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root
