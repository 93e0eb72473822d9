"""A tiny trained run shared by the model tests (a helper module, not a test file)."""
from __future__ import annotations

from pathlib import Path


def tiny_run(base: Path, *, seed: int, landmarks: int, per_landmark: int, test: int, epochs: int,
             bad: int) -> tuple[Path, Path, str]:
    """A head-only vgg16 run (bottleneck features, weights none, 32 px) on a synthetic competition whose
    test image number `bad` is corrupt → (run folder, competition folder, the corrupt image's id)."""
    from pipeline.acquire.competition import Competition
    from pipeline.acquire.synth import make_competition
    from pipeline.model.train import train

    root = base / "comp"
    make_competition(root, seed=seed, landmarks=landmarks, per_landmark=per_landmark, test=test,
                     distractor_frac=0.25, size=32)
    comp = Competition(root)
    bad_id = comp.test_ids[bad]
    comp.image_path(bad_id, "test").write_bytes(b"garbage")
    out = base / "run"
    train(root, backbone="vgg16", out=out, weights="none", image_size=32, epochs=epochs, fine_tune_epochs=0,
          batch_size=8, precision="fp32")
    return out, root, bad_id
