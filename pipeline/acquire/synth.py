"""`glr synth`: a small synthetic landmark-recognition competition in Kaggle's 2021 layout.

Why it exists: every later stage (training, local-feature verification, rescoring, GAP
tuning) needs data with the real competition's difficulties, offline and in seconds.
So the generator is built to reproduce them, not just the file format:

- each landmark is a procedurally drawn, mostly planar façade (sky, wall, window grid,
  arches, roof, door) carrying high-frequency detail specific to that landmark (ornaments,
  patterned panels, signs with glyph-like strokes, per-window interiors), so SIFT + RANSAC
  finds many inliers between two views of one landmark and few between different ones;
- each photo is a new view of the landmark's canonical scene: perspective warp, crop,
  scale, rotation (±15°), lighting and colour jitter, blur, noise, occluders, JPEG;
- landmarks come in confusable groups of 2–3 that share palette and global structure and
  differ only in local detail (a CNN confuses them; local features tell them apart);
- test queries are new views of train landmarks plus distractors (non-landmark images:
  natural textures, rooms, faces, and façades that are no training landmark, some in a
  landmark's palette so a classifier is confidently wrong on them).

Everything is deterministic from the seed (same bytes on re-run) and written atomically.
"""
from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from submissions.errors import UserError
from submissions.files import atomic_dir

__all__ = ["make_competition"]

MAX_LANDMARK_ID = 200_000
JPEG_QUALITY = 90
SCENE_SCALE = 3  # canonical scenes are drawn at SCENE_SCALE × size
VIEW_SCALE = 2  # views are warped at VIEW_SCALE × size, then area-downsampled (no aliasing)


# -- small drawing helpers ------------------------------------------------------------------
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (r * 255.0, g * 255.0, b * 255.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically (vectorised)."""
    import cv2

    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.random((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    return np.clip(big[:h, :w], 0.0, 1.0)


def _fractal_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * _smooth_noise(rng, h, w, max(cell, 1.5))
        total += amp
        amp *= 0.5
        cell /= 2.0
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _pts(arr) -> np.ndarray:
    return np.round(np.asarray(arr, np.float64)).astype(np.int32).reshape(-1, 1, 2)


def _glyph(img: np.ndarray, rng: np.random.Generator, x: float, y: float, s: float, color, thick: int) -> None:
    """A random stroke shape: a polyline of 3–5 points in an s×s box (letter-like)."""
    import cv2

    n = int(rng.integers(3, 6))
    pts = np.column_stack([x + rng.random(n) * s, y + rng.random(n) * s])
    cv2.polylines(img, [_pts(pts)], bool(rng.random() < 0.3), color, thick, cv2.LINE_AA)


def _ornament(img: np.ndarray, rng: np.random.Generator, x: float, y: float, r: float, colors, thick: int) -> None:
    """One random ornament centred at (x, y) with radius r: polygon, rosette, star, cross, glyph."""
    import cv2

    kind = int(rng.integers(0, 6))
    c1 = colors[int(rng.integers(len(colors)))]
    c2 = colors[int(rng.integers(len(colors)))]
    if kind == 0:  # irregular filled polygon
        n = int(rng.integers(3, 7))
        ang = np.sort(rng.random(n)) * 2 * np.pi
        rad = r * rng.uniform(0.5, 1.0, n)
        cv2.fillPoly(img, [_pts(np.column_stack([x + rad * np.cos(ang), y + rad * np.sin(ang)]))], c1, cv2.LINE_AA)
    elif kind == 1:  # rosette: concentric circles, off-centre inner dot
        cv2.circle(img, (round(x), round(y)), max(2, round(r)), c1, -1, cv2.LINE_AA)
        cv2.circle(img, (round(x + r * 0.3 * rng.uniform(-1, 1)), round(y + r * 0.3 * rng.uniform(-1, 1))),
                   max(1, round(r * rng.uniform(0.3, 0.55))), c2, -1, cv2.LINE_AA)
    elif kind == 2:  # star
        n = int(rng.integers(4, 7))
        a0 = rng.random() * np.pi
        ang = a0 + np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.55))
        cv2.fillPoly(img, [_pts(np.column_stack([x + rad * np.cos(ang), y + rad * np.sin(ang)]))], c1, cv2.LINE_AA)
    elif kind == 3:  # asymmetric cross / T
        w = max(1, round(r * rng.uniform(0.25, 0.45)))
        cv2.rectangle(img, (round(x - w), round(y - r)), (round(x + w), round(y + r * rng.uniform(0.2, 1))), c1, -1)
        yy = y - r * rng.uniform(-0.2, 0.6)
        cv2.rectangle(img, (round(x - r), round(yy - w)), (round(x + r * rng.uniform(0.2, 1)), round(yy + w)), c1, -1)
    elif kind == 4:  # glyph strokes
        _glyph(img, rng, x - r, y - r, 2 * r, c1, thick)
        _glyph(img, rng, x - r, y - r, 2 * r, c2, max(1, thick - 1))
    else:  # tilted rectangle with a notch
        w, h = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.3, 0.7)
        a = rng.random() * np.pi
        ca, sa = np.cos(a), np.sin(a)
        box = np.array([[-w, -h], [w, -h], [w, h], [0, h * 0.2], [-w, h]])
        rot = box @ np.array([[ca, sa], [-sa, ca]])
        cv2.fillPoly(img, [_pts(rot + (x, y))], c1, cv2.LINE_AA)


# -- landmark scenes -----------------------------------------------------------------------
@dataclass
class _Style:
    """What a confusable group shares: palette and global structure."""

    sky_top: tuple
    sky_bot: tuple
    ground: tuple
    wall: tuple
    trim: tuple
    window: tuple
    roof: tuple
    accents: list
    x0: float
    x1: float
    top: float
    base: float
    floors: int
    cols: int
    win_w: float
    win_h: float
    arched: bool
    roof_kind: int
    door_w: float


def _style(rng: np.random.Generator, palette_from: _Style | None = None, hue: float | None = None) -> _Style:
    h = rng.random() if hue is None else hue
    wall_v = _u(rng, 0.5, 0.88)
    sunset = rng.random() < 0.25
    sky_h = _u(rng, 0.02, 0.1) if sunset else _u(rng, 0.55, 0.66)
    pal = dict(
        sky_top=_hsv(sky_h, _u(rng, 0.3, 0.7), _u(rng, 0.55, 0.9)),
        sky_bot=_hsv(sky_h + 0.03, _u(rng, 0.05, 0.3), _u(rng, 0.85, 1.0)),
        ground=_hsv(_u(rng, 0.05, 0.15), _u(rng, 0.1, 0.4), _u(rng, 0.3, 0.6)),
        wall=_hsv(h, _u(rng, 0.25, 0.6), wall_v),
        trim=_hsv(h + _u(rng, -0.05, 0.05), _u(rng, 0.2, 0.6), wall_v - _u(rng, 0.22, 0.4)),
        window=_hsv(h + _u(rng, 0.35, 0.65), _u(rng, 0.2, 0.5), _u(rng, 0.08, 0.3)),
        roof=_hsv(h + _u(rng, 0.3, 0.7), _u(rng, 0.3, 0.7), _u(rng, 0.25, 0.6)),
        accents=[_hsv(rng.random(), _u(rng, 0.4, 1.0), _u(rng, 0.05, 0.3) if k % 2 else _u(rng, 0.8, 1.0))
                 for k in range(6)],
    )
    if palette_from is not None:
        pal = {k: getattr(palette_from, k) for k in pal}
    x0 = _u(rng, 0.06, 0.2)
    return _Style(
        **pal,
        x0=x0,
        x1=min(0.95, x0 + _u(rng, 0.6, 0.86)),
        top=_u(rng, 0.22, 0.4),
        base=_u(rng, 0.86, 0.94),
        floors=int(rng.integers(2, 5)),
        cols=int(rng.integers(3, 7)),
        win_w=_u(rng, 0.35, 0.6),
        win_h=_u(rng, 0.4, 0.65),
        arched=bool(rng.random() < 0.5),
        roof_kind=int(rng.integers(0, 3)),
        door_w=_u(rng, 0.08, 0.16),
    )


def _render_facade(st: _Style, rng: np.random.Generator, C: int) -> np.ndarray:
    """Draw one façade: `st` fixes palette and structure, `rng` the landmark's own details."""
    import cv2

    yy = np.linspace(0.0, 1.0, C, dtype=np.float32)[:, None, None]
    sky = np.asarray(st.sky_top, np.float32) * (1 - yy) + np.asarray(st.sky_bot, np.float32) * yy
    img = np.broadcast_to(sky, (C, C, 3)).copy()
    # clouds: soft bright noise in the sky
    clouds = np.clip(_fractal_noise(rng, C, C, C / 4, 3) * 1.6 - 0.9, 0, 1)[:, :, None]
    img = img * (1 - 0.5 * clouds) + 255.0 * 0.5 * clouds
    gy = int(st.base * C)
    ground = np.asarray(st.ground, np.float32) * (0.8 + 0.4 * _fractal_noise(rng, C - gy, C, C / 16, 3)[:, :, None])
    img[gy:] = ground
    x0, x1, top = int(st.x0 * C), int(st.x1 * C), int(st.top * C)
    bw, bh = x1 - x0, gy - top
    # wall with low-frequency weathering
    wall = np.asarray(st.wall, np.float32) * (0.88 + 0.24 * _fractal_noise(rng, bh, bw, C / 10, 3)[:, :, None])
    img[top:gy, x0:x1] = wall
    img = np.clip(img, 0, 255).astype(np.uint8)
    # everything below is drawn in place with OpenCV on uint8
    t = max(1, round(C / 120))
    trim = tuple(map(float, st.trim))
    if st.roof_kind == 1:  # pediment
        apex = (round((x0 + x1) / 2), round(top - bh * 0.35))
        tri = _pts([(x0 - 2 * t, top), (x1 + 2 * t, top), apex])
        cv2.fillPoly(img, [tri], st.roof, cv2.LINE_AA)
        cv2.polylines(img, [tri], True, trim, 2 * t, cv2.LINE_AA)
    elif st.roof_kind == 2:  # dome
        cv2.ellipse(img, (round((x0 + x1) / 2), top), (round(bw * 0.28), round(bh * 0.3)), 0, 180, 360, st.roof, -1,
                    cv2.LINE_AA)
    cv2.rectangle(img, (x0 - 2 * t, top - 2 * t), (x1 + 2 * t, top + 2 * t), trim, -1)  # cornice
    fh = bh / st.floors
    cw = bw / st.cols
    door_x = (x0 + x1) / 2
    for f in range(st.floors):
        y_floor = top + f * fh
        if f:
            cv2.line(img, (x0, round(y_floor)), (x1, round(y_floor)), trim, t, cv2.LINE_AA)
        for c in range(st.cols):
            cx = x0 + (c + 0.5) * cw
            if f == st.floors - 1 and abs(cx - door_x) < cw * 0.5:
                continue  # the door takes this bay
            ww, wh = cw * st.win_w, fh * st.win_h
            wx0, wy0 = cx - ww / 2, y_floor + (fh - wh) * 0.55
            p0, p1 = (round(wx0), round(wy0)), (round(wx0 + ww), round(wy0 + wh))
            cv2.rectangle(img, p0, p1, st.window, -1)
            if st.arched:
                cv2.ellipse(img, (round(cx), round(wy0)), (round(ww / 2), round(ww / 2.5)), 0, 180, 360, st.window, -1,
                            cv2.LINE_AA)
                cv2.ellipse(img, (round(cx), round(wy0)), (round(ww / 2), round(ww / 2.5)), 0, 180, 360, trim, t,
                            cv2.LINE_AA)
            # this landmark's own window interior: curtain, lit pane, a shape behind the glass
            k = rng.random()
            acc = st.accents[int(rng.integers(len(st.accents)))]
            if k < 0.35:
                cv2.rectangle(img, p0, (p1[0], round(wy0 + wh * _u(rng, 0.2, 0.7))), acc, -1)
            elif k < 0.6:
                side = rng.random() < 0.5
                cv2.rectangle(img, (round(cx) if side else p0[0], p0[1]), (p1[0] if side else round(cx), p1[1]),
                              _hsv(_u(rng, 0.1, 0.16), 0.6, 0.95), -1)
            elif k < 0.85:
                _ornament(img, rng, cx + ww * _u(rng, -0.2, 0.2), wy0 + wh * _u(rng, 0.3, 0.7), ww * 0.3,
                          st.accents, t)
            cv2.rectangle(img, p0, p1, trim, t)
            cv2.line(img, (round(cx), p0[1]), (round(cx), p1[1]), trim, max(1, t // 2))
    # door
    dw = bw * st.door_w
    dy0 = gy - fh * 0.8
    cv2.rectangle(img, (round(door_x - dw / 2), round(dy0)), (round(door_x + dw / 2), gy), st.window, -1)
    cv2.ellipse(img, (round(door_x), round(dy0)), (round(dw / 2), round(dw / 2)), 0, 180, 360, st.window, -1,
                cv2.LINE_AA)
    cv2.ellipse(img, (round(door_x), round(dy0)), (round(dw / 2), round(dw / 2)), 0, 180, 360, trim, 2 * t,
                cv2.LINE_AA)
    _landmark_details(img, st, rng, C, (x0, top, x1, gy), t)
    return img


def _landmark_details(img: np.ndarray, st: _Style, rng: np.random.Generator, C: int, box, t: int) -> None:
    """High-frequency detail unique to one landmark: patterned panels, ornaments, signs."""
    import cv2

    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    colors = list(st.accents) + [st.trim]
    # patterned panels: thresholded noise in two contrasting colours (blob-rich for SIFT)
    for _ in range(int(rng.integers(2, 5))):
        pw, ph = round(bw * _u(rng, 0.12, 0.25)), round(bh * _u(rng, 0.08, 0.18))
        px, py = round(x0 + rng.random() * (bw - pw)), round(y0 + rng.random() * (bh - ph))
        mask = _smooth_noise(rng, ph, pw, C / _u(rng, 25, 40)) > 0.5
        ca = np.asarray(colors[int(rng.integers(len(colors)))], np.float32)
        cb = np.asarray(st.accents[int(rng.integers(len(st.accents)))], np.float32)
        if abs(float(ca.mean()) - float(cb.mean())) < 60:
            cb = 255.0 - ca
        img[py:py + ph, px:px + pw] = np.where(mask[:, :, None], ca, cb).astype(np.uint8)
        cv2.rectangle(img, (px, py), (px + pw, py + ph), st.trim, t)
    # ornaments scattered over the façade (and a few on the roof line)
    for _ in range(int(rng.integers(28, 45))):
        r = C * _u(rng, 0.012, 0.035)
        _ornament(img, rng, x0 + rng.random() * bw, y0 - bh * 0.05 + rng.random() * bh * 1.05, r, colors, t)
    # signs with glyph rows
    for _ in range(int(rng.integers(1, 3))):
        sw, sh = bw * _u(rng, 0.2, 0.35), bh * _u(rng, 0.06, 0.1)
        sx, sy = x0 + rng.random() * (bw - sw), y0 + rng.random() * (bh - sh)
        bg = st.accents[int(rng.integers(len(st.accents)))]
        fg = (255.0, 255.0, 255.0) if np.mean(bg) < 128 else (15.0, 15.0, 15.0)
        cv2.rectangle(img, (round(sx), round(sy)), (round(sx + sw), round(sy + sh)), bg, -1)
        n = max(2, int(sw / (sh * 0.8)))
        for g in range(n):
            _glyph(img, rng, sx + sh * 0.15 + g * (sw - sh * 0.3) / n, sy + sh * 0.15, sh * 0.7, fg, t)


# -- distractor scenes (no training landmark) ----------------------------------------------
def _render_nature(rng: np.random.Generator, C: int) -> np.ndarray:
    import cv2

    hs = [rng.random(), rng.random(), rng.random()]
    cols = np.array([_hsv(h, _u(rng, 0.3, 0.8), _u(rng, 0.15, 0.95)) for h in hs], np.float32)
    n = _fractal_noise(rng, C, C, C / _u(rng, 2, 6), 5)
    w0 = np.clip(1 - 2 * n, 0, 1)[:, :, None]
    w2 = np.clip(2 * n - 1, 0, 1)[:, :, None]
    img = cols[0] * w0 + cols[2] * w2 + cols[1] * (1 - w0 - w2)
    if rng.random() < 0.6:  # horizon with sky
        hy = int(C * _u(rng, 0.2, 0.5))
        yy = np.linspace(0, 1, hy, dtype=np.float32)[:, None, None]
        img[:hy] = np.asarray(_hsv(_u(rng, 0.5, 0.68), 0.5, 0.9), np.float32) * (1 - 0.3 * yy)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 12))):  # bushes / rocks
        c = _hsv(_u(rng, 0.2, 0.4) if rng.random() < 0.7 else rng.random(), _u(rng, 0.3, 0.8), _u(rng, 0.1, 0.6))
        cv2.ellipse(img, (int(rng.integers(C)), int(rng.integers(C // 3, C))),
                    (int(C * _u(rng, 0.02, 0.12)), int(C * _u(rng, 0.02, 0.08))), _u(rng, 0, 180), 0, 360, c, -1,
                    cv2.LINE_AA)
    return img


def _render_room(rng: np.random.Generator, C: int) -> np.ndarray:
    import cv2

    wall = np.asarray(_hsv(rng.random(), _u(rng, 0.05, 0.4), _u(rng, 0.5, 0.95)), np.float32)
    img = np.broadcast_to(wall, (C, C, 3)) * (0.9 + 0.2 * _smooth_noise(rng, C, C, C / 3)[:, :, None])
    img = np.clip(img, 0, 255).astype(np.uint8)
    fy = int(C * _u(rng, 0.55, 0.75))
    floor = _hsv(_u(rng, 0.05, 0.12), _u(rng, 0.3, 0.7), _u(rng, 0.2, 0.6))
    cv2.fillPoly(img, [_pts([(0, C), (C, C), (C * 0.8, fy), (C * 0.2, fy)])], floor)
    for _ in range(int(rng.integers(2, 6))):  # furniture / frames / screens
        w, h = C * _u(rng, 0.08, 0.35), C * _u(rng, 0.06, 0.3)
        x, y = rng.random() * (C - w), rng.random() * (C - h)
        c = _hsv(rng.random(), _u(rng, 0.1, 0.8), _u(rng, 0.1, 0.9))
        cv2.rectangle(img, (round(x), round(y)), (round(x + w), round(y + h)), c, -1)
        if rng.random() < 0.5:  # a picture in a frame
            inner = _fractal_noise(rng, max(2, round(h * 0.7)), max(2, round(w * 0.7)), C / 20, 3)
            ih, iw = inner.shape
            oy, ox = round(y + (h - ih) / 2), round(x + (w - iw) / 2)
            tint = np.asarray(_hsv(rng.random(), 0.6, 0.9), np.float32)
            img[oy:oy + ih, ox:ox + iw] = np.clip(inner[:, :, None] * tint, 0, 255).astype(np.uint8)
    if rng.random() < 0.7:  # lamp
        cv2.circle(img, (int(rng.integers(C)), int(C * _u(rng, 0.05, 0.3))), int(C * _u(rng, 0.03, 0.07)),
                   (255, 245, 200), -1, cv2.LINE_AA)
    return img


def _render_face(rng: np.random.Generator, C: int) -> np.ndarray:
    import cv2

    bg = _fractal_noise(rng, C, C, C / 3, 3)[:, :, None]
    img = np.clip(bg * np.asarray(_hsv(rng.random(), 0.4, 0.9), np.float32), 0, 255).astype(np.uint8)
    cx, cy = C * _u(rng, 0.35, 0.65), C * _u(rng, 0.4, 0.6)
    fw, fh = C * _u(rng, 0.18, 0.28), C * _u(rng, 0.24, 0.34)
    skin = _hsv(_u(rng, 0.03, 0.09), _u(rng, 0.25, 0.6), _u(rng, 0.35, 0.95))
    hair = _hsv(_u(rng, 0.02, 0.12), _u(rng, 0.2, 0.8), _u(rng, 0.05, 0.6))
    cv2.ellipse(img, (round(cx), round(cy + fh * 1.5)), (round(fw * 2), round(fh)), 0, 180, 360,
                _hsv(rng.random(), 0.6, 0.5), -1, cv2.LINE_AA)  # shoulders
    cv2.ellipse(img, (round(cx), round(cy - fh * 0.15)), (round(fw * 1.08), round(fh * 1.05)), 0, 0, 360, hair, -1,
                cv2.LINE_AA)
    cv2.ellipse(img, (round(cx), round(cy)), (round(fw), round(fh)), 0, 0, 360, skin, -1, cv2.LINE_AA)
    for s in (-1, 1):
        ex, ey = round(cx + s * fw * 0.4), round(cy - fh * 0.15)
        cv2.ellipse(img, (ex, ey), (round(fw * 0.18), round(fh * 0.08)), 0, 0, 360, (240, 240, 240), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, ey), max(1, round(fh * 0.06)), (30, 30, 30), -1, cv2.LINE_AA)
    cv2.ellipse(img, (round(cx), round(cy + fh * 0.45)), (round(fw * 0.35), round(fh * 0.1)), 0, 0, 180,
                (120, 40, 40), max(1, round(C / 100)), cv2.LINE_AA)
    return img


# -- views ---------------------------------------------------------------------------------
def _view(scene: np.ndarray, rng: np.random.Generator, size: int, focus: tuple[float, float]) -> np.ndarray:
    """One photo of a scene: perspective crop, rotation, lighting, blur, noise, occluders."""
    import cv2

    C = scene.shape[0]
    W = VIEW_SCALE * size
    # about one photo in ten is hard: a close-up of one part, blurrier, more occluded
    hard = rng.random() < 0.1
    side = C * (_u(rng, 0.4, 0.55) if hard else _u(rng, 0.55, 0.9))
    cx = C * (focus[0] + _u(rng, -0.1, 0.1))
    cy = C * (focus[1] + _u(rng, -0.1, 0.1))
    a = np.deg2rad(_u(rng, -15, 15))
    ca, sa = np.cos(a), np.sin(a)
    half = side / 2
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    src = corners @ np.array([[ca, sa], [-sa, ca]]) + (cx, cy)
    # perspective: pull one side in (looking at the façade from an angle) plus corner jitter
    tilt = _u(rng, -0.12, 0.12) * side
    src[[1, 2] if tilt > 0 else [0, 3], 1] += np.array([1, -1]) * abs(tilt) / 2
    src += rng.uniform(-0.04, 0.04, (4, 2)) * side
    dst = np.array([[0, 0], [W, 0], [W, W], [0, W]], np.float64)
    H = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))
    img = cv2.warpPerspective(scene, H, (W, W), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    # occluders: people, poles, blobs (drawn before blur/lighting, like real foreground)
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]) + 2 * hard)):
        col = _hsv(rng.random(), _u(rng, 0.1, 0.8), _u(rng, 0.05, 0.7))
        kind = rng.random()
        x, y = rng.random() * W, W * _u(rng, 0.45, 1.0)
        if kind < 0.5:  # person: head + body
            h = W * _u(rng, 0.15, 0.35)
            cv2.ellipse(img, (round(x), round(y)), (round(h * 0.18), round(h * 0.45)), 0, 0, 360, col, -1, cv2.LINE_AA)
            cv2.circle(img, (round(x), round(y - h * 0.55)), max(1, round(h * 0.12)),
                       _hsv(_u(rng, 0.03, 0.09), 0.4, _u(rng, 0.3, 0.9)), -1, cv2.LINE_AA)
        elif kind < 0.75:  # pole / tree trunk
            w = W * _u(rng, 0.02, 0.05)
            cv2.rectangle(img, (round(x), round(W * _u(rng, 0, 0.4))), (round(x + w), W), col, -1)
        else:  # blob (bush, car, umbrella)
            cv2.ellipse(img, (round(x), round(y)), (round(W * _u(rng, 0.05, 0.15)), round(W * _u(rng, 0.04, 0.1))),
                        _u(rng, 0, 180), 0, 360, col, -1, cv2.LINE_AA)
    # the rest works at the output size (4× fewer pixels): area-downsample first
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    f = img.astype(np.float32) * np.float32(1 / 255.0)
    # lighting: gamma, exposure, colour cast, a brightness gradient across the frame
    f = cv2.pow(f, _u(rng, 0.75, 1.3))
    gain = _u(rng, 0.7, 1.2) * rng.uniform(0.88, 1.12, 3).astype(np.float32)
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ga = rng.random() * 2 * np.pi
    grad = 1.0 + _u(rng, 0, 0.18) * (np.cos(ga) * g[None, :] + np.sin(ga) * g[:, None])
    f *= (grad[:, :, None] * (gain * np.float32(255.0))[None, None, :]).astype(np.float32)
    sigma = _u(rng, 0.0, 1.0 + 0.6 * hard)
    if sigma > 0.15:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    f += rng.standard_normal(f.shape, dtype=np.float32) * np.float32(_u(rng, 0.5, 5.0))
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# -- the competition -----------------------------------------------------------------------
def _unique_ids(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """n new 16-hex-character ids (Kaggle's style), none in `taken`."""
    out: list[str] = []
    while len(out) < n:
        i = rng.bytes(8).hex()
        if i not in taken:
            taken.add(i)
            out.append(i)
    return out


def _groups(rng: np.random.Generator, n: int) -> list[list[int]]:
    """Partition landmark indices: ~60% in confusable groups of 2–3, the rest alone."""
    order = rng.permutation(n).tolist()
    groups: list[list[int]] = []
    i = 0
    grouped = int(round(n * 0.6))
    while i < n:
        k = min(int(rng.integers(2, 4)), grouped - i)
        k = k if k >= 2 else 1
        groups.append(sorted(order[i:i + k]))
        i += k
    return groups


def _check(name: str, value, lo, hi=None) -> None:
    if value < lo or (hi is not None and value > hi):
        rng_txt = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise UserError(f"--{name.replace('_', '-')} {value}: must be {rng_txt}")


def make_competition(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    landmarks: int = 20,
    per_landmark: int = 30,
    test: int = 200,
    distractor_frac: float = 0.3,
    size: int = 96,
    public_frac: float = 0.5,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic competition in Kaggle's 2021 layout to `out`; return a summary.

    Files: `train.csv` (id,landmark_id), `train/a/b/c/<id>.jpg`, `test/a/b/c/<id>.jpg`,
    `sample_submission.csv` (id, empty landmarks), `solution.csv` (id,landmarks,Usage),
    and `synth.json` (the parameters and the confusable groups, for tests and curiosity).
    The same arguments always give the same bytes. `out` is built in a temporary folder
    beside it and renamed into place; an existing non-empty `out` needs `overwrite=True`.
    """
    import pandas as pd

    from pipeline.acquire.competition import hashed_relpath
    from pipeline.progress import progress

    _check("landmarks", landmarks, 1, MAX_LANDMARK_ID)
    _check("per_landmark", per_landmark, 1)
    _check("test", test, 0)
    _check("distractor_frac", distractor_frac, 0.0, 1.0)
    _check("size", size, 32, 1024)
    _check("public_frac", public_frac, 0.0, 1.0)
    _check("seed", seed, 0)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: directory is not empty; choose another OUT or pass --overwrite")

    rng = np.random.default_rng([seed, 0])
    C = SCENE_SCALE * size
    lids = np.sort(rng.choice(MAX_LANDMARK_ID + 1, size=landmarks, replace=False)).astype(np.int64)
    lids = lids[rng.permutation(landmarks)]  # so landmark order says nothing about the id
    groups = _groups(rng, landmarks)
    styles: list[_Style | None] = [None] * landmarks
    hue0 = rng.random()
    for gi, g in enumerate(groups):
        # groups' hues spread around the colour wheel: different groups look different,
        # the members of one group are what a classifier confuses
        hue = hue0 + gi * 0.618034 + rng.uniform(-0.04, 0.04)
        st = _style(np.random.default_rng([seed, 1, gi]), hue=hue)
        for li in g:
            styles[li] = st
    taken: set[str] = set()
    train_ids = _unique_ids(rng, landmarks * per_landmark, taken)
    test_ids = _unique_ids(rng, test, taken)
    n_dist = int(round(test * distractor_frac))
    n_land = test - n_dist
    query_lm = np.resize(rng.permutation(landmarks), n_land)
    test_label = np.concatenate([query_lm, np.full(n_dist, -1)])[rng.permutation(test)]
    usage = np.where(rng.permutation(test) < int(round(test * public_frac)), "Public", "Private")

    with atomic_dir(out) as tmp:  # an existing OUT is only replaced once the new one is complete
        made: set[Path] = set()

        def write(split: str, image_id: str, rgb: np.ndarray) -> None:
            path = tmp / split / hashed_relpath(image_id)
            if path.parent not in made:  # one mkdir per folder, not per image
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_bytes(_jpeg(rgb))

        rows = []
        for li in progress(range(landmarks), total=landmarks, desc="landmarks", unit="landmark"):
            st = styles[li]
            scene = _render_facade(st, np.random.default_rng([seed, 2, li]), C)
            focus = ((st.x0 + st.x1) / 2, (st.top + st.base) / 2)
            for j in range(per_landmark):
                image_id = train_ids[li * per_landmark + j]
                write("train", image_id, _view(scene, np.random.default_rng([seed, 3, li, j]), size, focus))
                rows.append((image_id, int(lids[li])))
            for k in np.flatnonzero(test_label == li):
                write("test", test_ids[k], _view(scene, np.random.default_rng([seed, 4, int(k)]), size, focus))
        kinds = {"facade": 0, "nature": 0, "room": 0, "face": 0}
        for k in progress(np.flatnonzero(test_label < 0).tolist(), total=n_dist, desc="distractors", unit="image"):
            r = np.random.default_rng([seed, 5, int(k)])
            u = r.random()
            focus = (0.5, 0.5)
            if u < 0.45:
                kind = "facade"
                borrow = styles[int(r.integers(landmarks))] if r.random() < 0.6 else None
                st = _style(r, palette_from=borrow)
                scene = _render_facade(st, r, C)
                focus = ((st.x0 + st.x1) / 2, (st.top + st.base) / 2)
            elif u < 0.65:
                kind, scene = "nature", _render_nature(r, C)
            elif u < 0.85:
                kind, scene = "room", _render_room(r, C)
            else:
                kind, scene = "face", _render_face(r, C)
            kinds[kind] += 1
            write("test", test_ids[k], _view(scene, r, size, focus))

        train = pd.DataFrame(rows, columns=["id", "landmark_id"]).sort_values("id", kind="stable")
        train.to_csv(tmp / "train.csv", index=False)
        order = np.argsort(np.asarray(test_ids, dtype=object), kind="stable") if test else np.zeros(0, int)
        ids_sorted = [test_ids[k] for k in order]
        pd.DataFrame({"id": ids_sorted, "landmarks": [""] * test}).to_csv(tmp / "sample_submission.csv", index=False)
        truth = ["" if test_label[k] < 0 else str(int(lids[test_label[k]])) for k in order]
        pd.DataFrame({"id": ids_sorted, "landmarks": truth, "Usage": usage[order] if test else []}).to_csv(
            tmp / "solution.csv", index=False)
        (tmp / "test").mkdir(exist_ok=True)
        summary = {
            "seed": seed,
            "size": size,
            "landmarks": landmarks,
            "per_landmark": per_landmark,
            "train_images": landmarks * per_landmark,
            "test_images": test,
            "landmark_queries": n_land,
            "distractors": n_dist,
            "distractor_kinds": kinds,
            "public": int((usage == "Public").sum()),
            "private": int((usage == "Private").sum()),
            "landmark_ids": sorted(int(x) for x in lids),
            "confusable_groups": [sorted(int(lids[i]) for i in g) for g in groups if len(g) > 1],
        }
        (tmp / "synth.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return {"path": str(out), **summary}
