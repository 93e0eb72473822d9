"""Picture of a verified pair: the two images side by side, inlier matches drawn as lines (`glr match --plot`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from submissions.errors import UserError


def plot_matches(img_a: str | os.PathLike, img_b: str | os.PathLike, pts_a: np.ndarray, pts_b: np.ndarray,
                 out: str | os.PathLike, *, height: int = 480, title: str = "") -> Path:
    """Write a PNG: both images scaled to `height`, lines between matched points (original-pixel (x, y))."""
    import cv2

    from pipeline.verify.features import original_size
    from pipeline.images import load_rgb
    from submissions.files import atomic_path

    panels, scales = [], []
    for path in (img_a, img_b):
        rgb = load_rgb(path, max_side=4 * height)
        w0, h0 = original_size(path)
        s = height / rgb.shape[0]
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * s)), height), interpolation=cv2.INTER_AREA)
        panels.append(rgb)
        scales.append(rgb.shape[1] / w0)  # original pixels → panel pixels
    canvas = np.concatenate(panels, axis=1).copy()
    off = panels[0].shape[1]
    rng = np.random.default_rng(0)
    for (xa, ya), (xb, yb) in zip(np.asarray(pts_a, float), np.asarray(pts_b, float)):
        color = tuple(int(c) for c in rng.integers(64, 256, 3))
        pa = (int(round(xa * scales[0])), int(round(ya * scales[0])))
        pb = (int(round(xb * scales[1])) + off, int(round(yb * scales[1])))
        cv2.line(canvas, pa, pb, color, 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 3, color, 1, cv2.LINE_AA)
        cv2.circle(canvas, pb, 3, color, 1, cv2.LINE_AA)
    if title:
        cv2.putText(canvas, title, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(canvas, title, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 0), 1, cv2.LINE_AA)
    out = Path(out)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"{out}: could not encode the PNG")
    with atomic_path(out, suffix=".png") as tmp:
        tmp.write_bytes(buf.tobytes())
    return out
