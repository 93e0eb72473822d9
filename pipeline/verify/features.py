"""Local-feature extractors behind one interface: SIFT/RootSIFT (default, offline), ORB, DELF.

Every extractor returns `Features`: keypoint locations (x, y) in ORIGINAL-image pixels, one
descriptor per keypoint, its scale and a score (response / attention). Images are read with
`pipeline.images.load_rgb(path, max_side)`; the factor between the working size and the
original size is kept (`work_scale`) so that RANSAC thresholds stay in working pixels.

An `ExtractorConfig` names everything that changes the output; its `key()` (a short hash) keys
the on-disk cache (`pipeline.verify.cache`), so changing a setting never reads stale features.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.options import VERIFY
from submissions.errors import UserError

EXTRACTORS = VERIFY["extractor"].choices
DELF_HANDLE = VERIFY.default("delf_handle")
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


class Features(NamedTuple):
    """One image's local features; `locations` are (x, y) in original-image pixels."""

    locations: np.ndarray  # N×2 float32
    descriptors: np.ndarray  # N×D float32 (sift: RootSIFT, delf) or uint8 (orb: binary)
    scales: np.ndarray  # N float32 (keypoint size in original pixels, or DELF pyramid scale)
    scores: np.ndarray  # N float32 (detector response, or DELF attention)
    work_scale: float = 1.0  # working-image pixels per original pixel (≤ 1)

    @property
    def n(self) -> int:
        """Number of keypoints (len() would count the tuple's fields)."""
        return int(self.locations.shape[0])

    @property
    def work_locations(self) -> np.ndarray:
        """Locations in the working image's pixels (what RANSAC thresholds are measured in)."""
        return self.locations * np.float32(self.work_scale)


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT of SIFT descriptors: L1-normalise, square root — unit L2 norm, so the dot product is the
    Hellinger kernel (a float32 copy)."""
    desc = np.asarray(desc, np.float32).copy()
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(desc, out=desc)


def empty_features(dim: int = 128, dtype=np.float32) -> Features:
    return Features(np.zeros((0, 2), np.float32), np.zeros((0, dim), dtype), np.zeros(0, np.float32),
                    np.zeros(0, np.float32), 1.0)


@dataclass(frozen=True)
class ExtractorConfig:
    """Everything that changes an extractor's output (and so the cache key).

    Defaults were chosen on real landmark photos (benchmarks/real_pairs.py, RESULTS.md).
    """

    name: str = "sift"
    max_side: int = VERIFY.default("max_side")  # working image size (longest side)
    n_features: int = VERIFY.default("n_features")  # sift/orb: at most this many keypoints (strongest first)
    rootsift: bool = True  # sift: Hellinger-normalised descriptors (RootSIFT)
    # sift: OpenCV's default is 0.04; 0.02 keeps keypoints on low-contrast photos (night, haze, plain facades),
    # so that more images reach n_features (real photos: 894 → 967 keypoints per image at 1000; ROC AUC +0.01..0.02)
    contrast_threshold: float = 0.02
    # sift: RootSIFT projected to this many dims (pipeline.verify.projection: fixed PCA, renormalised), 0 = the
    # full 128; 64 halves the cache entry and matching's matrix product at the same ROC AUC (benchmarks/real_pairs.py)
    pca_dims: int = 64
    # DELF (TF-Hub) options, used only when name == "delf"
    handle: str = DELF_HANDLE
    score_threshold: float = 100.0
    image_scales: tuple[float, ...] = DELF_SCALES
    max_feature_num: int = 1000

    def __post_init__(self):
        if self.name not in EXTRACTORS:
            raise UserError(f"unknown extractor {self.name!r} (--extractor); choose one of: {', '.join(EXTRACTORS)}")
        if self.max_side is not None and int(self.max_side) < 16:
            raise UserError(f"--max-side must be at least 16 pixels, got {self.max_side}")
        if int(self.n_features) < 1:
            raise UserError(f"--n-features must be positive, got {self.n_features}")
        if self.pca_dims and not (self.rootsift and 0 < int(self.pca_dims) <= 64):
            raise ValueError(f"pca_dims must be 0 or in 1..64 and needs rootsift, got {self.pca_dims}")
        object.__setattr__(self, "image_scales", tuple(float(s) for s in self.image_scales))

    @property
    def descriptor_dim(self) -> int:
        """Width of one descriptor: SIFT's 128 (or its RootSIFT projection's pca_dims), ORB's 32 bytes, DELF's 40."""
        if self.name == "sift":
            return int(self.pca_dims) if self.rootsift and self.pca_dims else 128
        return {"orb": 32, "delf": 40}[self.name]

    def relevant(self) -> dict:
        """Only the settings this extractor uses (so the key ignores the others)."""
        d = dataclasses.asdict(self)
        if self.name == "delf":
            keep = ("name", "max_side", "handle", "score_threshold", "image_scales", "max_feature_num")
        elif self.name == "sift":
            keep = ("name", "max_side", "n_features", "rootsift", "contrast_threshold", "pca_dims")
        else:
            keep = ("name", "max_side", "n_features")
        out = {k: d[k] for k in keep}
        if self.name == "sift" and self.pca_dims:
            from pipeline.verify.projection import basis_digest

            out["pca"] = basis_digest()  # a refitted projection is a new cache
        return out

    def key(self) -> str:
        """Short stable hash of the relevant settings (the cache folder name)."""
        blob = json.dumps({"v": 1, **self.relevant()}, sort_keys=True, default=list)
        return f"{self.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def make_config(extractor: str = "sift", **overrides) -> ExtractorConfig:
    """Config for `extractor` with `overrides` (None values mean "the default")."""
    kw = {k: v for k, v in overrides.items() if v is not None}
    return ExtractorConfig(name=extractor, **kw)


def original_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header only (pipeline.images: the one reader)."""
    from pipeline.images import read_header

    return read_header(path).oriented_size


# -- extractors ---------------------------------------------------------------------------------


class Extractor:
    """Turns an RGB uint8 image into `Features`; subclasses implement `_extract`."""

    def __init__(self, config: ExtractorConfig):
        self.config = config

    def extract_array(self, rgb: np.ndarray, work_scale: float = 1.0) -> Features:
        """Features of an already-loaded working image; locations divided by `work_scale`."""
        feats = self._extract(np.ascontiguousarray(rgb))
        if work_scale != 1.0:
            feats = feats._replace(locations=(feats.locations / np.float32(work_scale)).astype(np.float32),
                                   work_scale=float(work_scale))
        return feats

    def extract_path(self, path: str | os.PathLike) -> Features:
        """Read `path` at the configured working size and extract (ImageReadError if unreadable)."""
        from pipeline.images import ImageReadError, load_rgb

        if not Path(path).exists():
            raise ImageReadError(f"{path}: no such image file")
        rgb = load_rgb(path, self.config.max_side)
        try:
            w0, h0 = original_size(path)
            scale = max(rgb.shape[:2]) / max(w0, h0)
        except Exception:
            scale = 1.0
        return self.extract_array(rgb, scale)

    def _extract(self, rgb: np.ndarray) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


class SiftExtractor(Extractor):
    """OpenCV SIFT; RootSIFT descriptors (L1-normalise, square root) unless rootsift=False, projected to
    `pca_dims` unit vectors when set (pipeline.verify.projection)."""

    def __init__(self, config: ExtractorConfig):
        super().__init__(config)
        import cv2

        self._sift = cv2.SIFT_create(nfeatures=int(config.n_features),
                                     contrastThreshold=float(config.contrast_threshold))

    def _extract(self, rgb: np.ndarray) -> Features:
        kps, desc = self._sift.detectAndCompute(_gray(rgb), None)
        if desc is None or not kps:
            return empty_features(self.config.descriptor_dim)
        kps, desc = kps[: self.config.n_features], desc[: self.config.n_features]
        desc = desc.astype(np.float32)
        if self.config.rootsift:
            desc = rootsift(desc)
            if self.config.pca_dims:
                from pipeline.verify.projection import project

                desc = project(desc, int(self.config.pca_dims))
        else:
            desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-7)
        return _from_keypoints(kps, desc)


class OrbExtractor(Extractor):
    """OpenCV ORB (binary 32-byte descriptors, Hamming distance): fast, less robust."""

    def __init__(self, config: ExtractorConfig):
        super().__init__(config)
        import cv2

        self._orb = cv2.ORB_create(nfeatures=int(config.n_features))

    def _extract(self, rgb: np.ndarray) -> Features:
        kps, desc = self._orb.detectAndCompute(_gray(rgb), None)
        if desc is None or not kps:
            return empty_features(32, np.uint8)
        return _from_keypoints(kps, desc.astype(np.uint8))


def _from_keypoints(kps, desc: np.ndarray) -> Features:
    loc = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    size = np.array([k.size for k in kps], dtype=np.float32)
    resp = np.array([k.response for k in kps], dtype=np.float32)
    return Features(loc, desc, size, resp, 1.0)


DELF_INPUTS = ("image", "score_threshold", "image_scales", "max_feature_num")
DELF_FORMAT = (
    "glr needs DELF in TF-Hub's format, as https://tfhub.dev/google/delf/1 (TF1 Hub format: a folder with "
    "saved_model.pb and tfhub_module.pb, signature 'default' with inputs " + ", ".join(DELF_INPUTS) +
    " and outputs locations, descriptors, scales, attention); "
    "to get a local copy, on a machine with internet run TFHUB_CACHE_DIR=DIR python -c \"import tensorflow_hub "
    "as hub; print(hub.resolve('https://tfhub.dev/google/delf/1'))\" and pass the folder it prints with "
    "--delf-handle ([verify] delf_handle); or use --extractor sift offline"
)


def import_hub():
    """tensorflow_hub, or a UserError saying how to install it (0.16.1 imports pkg_resources at import)."""
    try:
        import tensorflow_hub as hub
    except ImportError as e:
        if e.name == "pkg_resources" or "pkg_resources" in str(e):
            raise UserError("tensorflow-hub needs pkg_resources: pip install 'setuptools<82' (setuptools 82 "
                            "removed it; tensorflow/hub#934), or use --extractor sift") from None
        raise UserError(f"DELF needs tensorflow-hub ({e}): pip install tensorflow-hub, or use --extractor sift") from None
    return hub


def configure_tensorflow(tf) -> None:
    """Before TensorFlow starts: one intra-/inter-op thread in a pinned worker process (the processes are
    the parallelism), and GPU memory growth so several DELF workers can share one GPU. Settings that
    come too late (TensorFlow already running in this process, e.g. after training) are left as they are."""
    from pipeline.parallel import in_pinned_worker

    if in_pinned_worker():
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass


def _signature_inputs(fn) -> list[str]:
    try:
        args, kwargs = fn.structured_input_signature
        return sorted(kwargs) or [getattr(a, "name", "?") for a in args]
    except Exception:  # not a concrete function: its inputs cannot be read
        return []


def delf_signature(module, handle: str):
    """The module's `default` signature, checked to take DELF's TF-Hub inputs; else a UserError naming what
    the folder has (e.g. a SavedModel exported by the DELF repository: inputs input_image, input_abs_thres…)."""
    sigs = getattr(module, "signatures", None) or {}
    fn = sigs.get("default") if hasattr(sigs, "get") else None
    have = _signature_inputs(fn) if fn is not None else []
    outputs = getattr(fn, "structured_outputs", None) or {}
    if fn is not None and set(DELF_INPUTS) <= set(have) and {"locations", "descriptors"} <= set(outputs):
        return fn
    found = "; ".join(f"{name}({', '.join(_signature_inputs(f))}) -> "
                      f"{', '.join(sorted(getattr(f, 'structured_outputs', None) or {})) or '?'}"
                      for name, f in sigs.items()) or "none"
    raise UserError(f"{handle}: not a DELF module in TF-Hub format (its signatures: {found}); {DELF_FORMAT}")


class DelfExtractor(Extractor):
    """DELF through TF-Hub: `hub.load(handle).signatures['default']` (handle: URL or folder).

    Called as the module expects: image float32 in [0, 1] (H×W×3), score_threshold,
    image_scales, max_feature_num. DELF returns locations as (y, x) in the input image;
    they are flipped to (x, y) here. Loading checks the module's format, so that a wrong
    handle stops a run with one line before any image is read.
    """

    def __init__(self, config: ExtractorConfig):
        super().__init__(config)
        from pipeline.model.backbones import quiet_tf

        tf = quiet_tf()  # lazily: only DELF needs TensorFlow
        configure_tensorflow(tf)
        hub = import_hub()
        self._tf = tf
        try:
            module = hub.load(config.handle)
        except Exception as e:
            raise UserError(
                f"cannot load the DELF module from {config.handle!r} ({e.__class__.__name__}: "
                f"{' '.join(str(e).split())[:300]}); {DELF_FORMAT}"
            ) from None
        self._module = module  # keep the object alive: the signature refers to its variables
        self._fn = delf_signature(module, config.handle)

    def _extract(self, rgb: np.ndarray) -> Features:
        tf = self._tf
        out = self._fn(
            image=tf.constant(rgb.astype(np.float32) / 255.0),
            score_threshold=tf.constant(float(self.config.score_threshold), tf.float32),
            image_scales=tf.constant(self.config.image_scales, tf.float32),
            max_feature_num=tf.constant(int(self.config.max_feature_num), tf.int32),
        )
        loc = np.asarray(out["locations"], dtype=np.float32).reshape(-1, 2)[:, ::-1]
        desc = np.asarray(out["descriptors"], dtype=np.float32)
        desc = desc.reshape(len(loc), -1) if len(loc) else np.zeros((0, desc.shape[-1] if desc.ndim == 2 else 40), np.float32)
        n = len(loc)
        scales = np.asarray(out["scales"], np.float32).reshape(-1) if "scales" in out else np.ones(n, np.float32)
        scores = np.asarray(out["attention"], np.float32).reshape(-1) if "attention" in out else np.ones(n, np.float32)
        return Features(np.ascontiguousarray(loc), desc, scales, scores, 1.0)


_CLASSES = {"sift": SiftExtractor, "orb": OrbExtractor, "delf": DelfExtractor}


def make_extractor(config: ExtractorConfig | str = "sift", **overrides) -> Extractor:
    """An extractor for a config (or an extractor name plus overrides)."""
    if isinstance(config, str):
        config = make_config(config, **overrides)
    return _CLASSES[config.name](config)
