"""The training input pipeline: train.csv + image paths → decoded image cache → tf.data.

Images are decoded once (Pillow via `pipeline.images.open_rgb`, so palette/CMYK/16-bit/EXIF
photos all work), resized to a square and written into a uint8 N×S×S×3 `.npy` cache in the run
directory. Decoding validates every image: a corrupt or missing file gives a warning naming its
id and is left out (and counted in the run manifest) — training never meets it mid-epoch.
Epochs then read the cache (memory-mapped) through `tf.data`: shuffle, batch, the study's
augmentation as Keras preprocessing layers / tf ops, prefetch.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError
from submissions.files import atomic_path

_WARN_LIMIT = 20  # corrupt images named one by one; the rest are counted


class ImageSkipped(UserWarning):
    """An image left out because it is missing or cannot be decoded."""


def select_rows(train: pd.DataFrame, *, max_per_class: int = 3000, min_per_class: int = 1,
                seed: int = 0) -> pd.DataFrame:
    """Cap each class at `max_per_class` images (random, seeded) and drop classes with fewer than
    `min_per_class`. Rows come back sorted by id."""
    if max_per_class < 1:
        raise UserError(f"--max-per-class {max_per_class}: must be at least 1")
    counts = train["landmark_id"].map(train["landmark_id"].value_counts())
    kept = train[counts.to_numpy() >= max(1, min_per_class)]
    rng = np.random.default_rng(seed)
    shuffled = kept.iloc[rng.permutation(len(kept))]
    capped = shuffled[shuffled.groupby("landmark_id").cumcount().to_numpy() < max_per_class]
    out = capped.sort_values("id", kind="stable").reset_index(drop=True)
    if out["landmark_id"].nunique() < 2:
        raise UserError(f"only {out['landmark_id'].nunique()} class(es) have at least --min-per-class "
                        f"{min_per_class} images; a classifier needs 2 or more (lower --min-per-class)")
    return out[["id", "landmark_id"]]


def stratified_split(rows: pd.DataFrame, *, val_frac: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """Add a `split` column (train/val): per class, round(val_frac × n) images go to validation,
    always leaving at least one for training (a class of one image has no validation image)."""
    if not 0 <= val_frac < 1:
        raise UserError(f"--val-frac {val_frac}: must be in [0, 1)")
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(rows))
    shuffled = rows.iloc[order]
    pos = shuffled.groupby("landmark_id").cumcount().to_numpy()
    size = shuffled.groupby("landmark_id")["id"].transform("size").to_numpy()
    n_val = np.minimum(np.rint(val_frac * size), size - 1)
    if val_frac > 0:
        n_val = np.where(size >= 2, np.maximum(n_val, 1), 0)
    split = np.where(pos < n_val, "val", "train")
    out = shuffled.assign(split=split).sort_values("id", kind="stable").reset_index(drop=True)
    return out


def load_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image as size×size×3 uint8 (squashed, as Keras' directory iterators do)."""
    from PIL import Image

    from pipeline.images import open_rgb

    img = open_rgb(path, max_side=2 * size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _try_load(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    if not path.exists():
        return None, "file missing"
    try:
        return load_square(path, size), None
    except UserError as e:
        return None, str(e).replace(f"{path}: ", "", 1)
    except Exception as e:  # a decoder bug on a hostile file must not stop the run
        return None, f"{e.__class__.__name__}: {e}"


def warn_skipped(skipped: list[dict], what: str = "image") -> None:
    """One warning per skipped image (the first few), then one with the count."""
    for s in skipped[:_WARN_LIMIT]:
        where = "" if s["path"] in s["reason"] else f" ({s['path']})"
        warnings.warn(f"skipped {what} {s['id']}: {s['reason']}{where}", ImageSkipped, stacklevel=2)
    if len(skipped) > _WARN_LIMIT:
        warnings.warn(f"skipped {len(skipped) - _WARN_LIMIT} more {what}s (see the manifest)", ImageSkipped,
                      stacklevel=2)


def iter_decoded(paths: list[Path], size: int, workers: int | None = None):
    """Yield (index, array or None, reason or None) in order, decoding on a thread pool
    (Pillow releases the GIL while decoding)."""
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool:
        chunk = 256
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            for j, (arr, reason) in enumerate(pool.map(lambda p: _try_load(p, size), part)):
                yield start + j, arr, reason


def decode_cache(ids: list[str], paths: list[Path], size: int, cache: str | os.PathLike, *,
                 desc: str = "decode") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode images once into `cache` (.npy, uint8 N×S×S×3) and `cache`.ok.npy (bool mask).

    Returns (memory-mapped images, ok mask, skipped [{id, path, reason}]). An existing complete
    cache with the same count and size is reused; the cache is written atomically.
    """
    from pipeline.progress import progress

    cache = Path(cache)
    ok_path = cache.with_name(cache.stem + ".ok.npy")
    n = len(ids)
    if cache.exists() and ok_path.exists():
        images = np.load(cache, mmap_mode="r")
        ok = np.load(ok_path)
        if images.shape == (n, size, size, 3) and len(ok) == n:
            skipped = [{"id": ids[i], "path": str(paths[i]), "reason": "cannot decode (cached)"}
                       for i in np.flatnonzero(~ok)]
            return images, ok, skipped
    ok = np.zeros(n, dtype=bool)
    skipped: list[dict] = []
    with atomic_path(cache, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        for i, arr, reason in progress(iter_decoded(paths, size), total=n, desc=desc):
            if arr is None:
                skipped.append({"id": ids[i], "path": str(paths[i]), "reason": reason})
            else:
                out[i] = arr
                ok[i] = True
        out.flush()
        del out
    with atomic_path(ok_path, suffix=".npy") as tmp:
        np.save(tmp, ok)
    warn_skipped(skipped)
    return np.load(cache, mmap_mode="r"), ok, skipped


def augmenter(seed: int = 0, flip: bool = False, rotation: float = 30.0, shift: float = 0.2,
              zoom: float = 0.5, brightness: tuple[float, float] = (0.5, 1.5)):
    """The study's augmentation as a Keras model on float 0–255 batches: rotation ±30°, shifts
    ±20 %, zoom 0.5–1.5, brightness ×0.5–1.5, horizontal flips only when asked."""
    from pipeline.model.backbones import quiet_tf

    tf = quiet_tf()
    import keras

    L = keras.layers
    layers = []
    if flip:
        layers.append(L.RandomFlip("horizontal", seed=seed, dtype="float32"))
    layers += [
        L.RandomRotation(rotation / 360.0, fill_mode="nearest", seed=seed + 1, dtype="float32"),
        L.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed + 2, dtype="float32"),
        L.RandomZoom((-zoom, zoom), fill_mode="nearest", seed=seed + 3, dtype="float32"),
    ]
    geo = keras.Sequential(layers, name="augment")
    lo, hi = brightness
    gen = tf.random.Generator.from_seed(seed + 4)

    def apply(x):
        x = tf.cast(geo(x, training=True), tf.float32)
        factor = gen.uniform((tf.shape(x)[0], 1, 1, 1), lo, hi)
        return tf.clip_by_value(x * factor, 0.0, 255.0)

    return apply


def image_dataset(images: np.ndarray, labels: np.ndarray | None, index: np.ndarray, *, batch_size: int,
                  shuffle: bool = False, augment=None, seed: int = 0, repeat: bool = False):
    """tf.data over rows `index` of a (memory-mapped) array — the image cache or cached features:
    shuffle → batch → gather → augment → prefetch. Yields float32 batches (and int32 labels)."""
    from pipeline.model.backbones import quiet_tf

    tf = quiet_tf()
    index = np.asarray(index, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices(index)
    if shuffle:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    shape = tuple(images.shape[1:])
    lab = None if labels is None else np.asarray(labels, dtype=np.int32)

    def gather(idx):
        idx = np.asarray(idx)
        order = np.argsort(idx)  # sorted reads from the memory map, then back to batch order
        x = np.empty((len(idx), *shape), dtype=np.float32)
        x[order] = images[idx[order]]
        return (x, lab[idx]) if lab is not None else x

    if lab is not None:
        def load(idx):
            x, y = tf.numpy_function(gather, [idx], [tf.float32, tf.int32])
            x.set_shape((None, *shape))
            y.set_shape((None,))
            return x, y
    else:
        def load(idx):
            x = tf.numpy_function(gather, [idx], tf.float32)
            x.set_shape((None, *shape))
            return x
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        if lab is not None:
            ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def path_dataset(paths: list[Path], size: int, *, batch_size: int):
    """tf.data that decodes images straight from their paths (for prediction): yields
    (float32 batch, ok mask batch); an unreadable image gives zeros and ok=False."""
    from pipeline.model.backbones import quiet_tf

    tf = quiet_tf()
    strs = [str(p) for p in paths]

    def load(p):
        arr, _ = _try_load(Path(p.decode() if isinstance(p, bytes) else str(p)), size)
        if arr is None:
            return np.zeros((size, size, 3), np.float32), False
        return arr.astype(np.float32), True

    def tf_load(p):
        x, ok = tf.numpy_function(load, [p], [tf.float32, tf.bool])
        x.set_shape((size, size, 3))
        ok.set_shape(())
        return x, ok

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(strs, dtype=tf.string) if strs else
                                            tf.constant([], dtype=tf.string))
    return ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size) \
        .prefetch(tf.data.AUTOTUNE)


def extract_features(extractor, images: np.ndarray, index: np.ndarray, path: str | os.PathLike, *,
                     batch_size: int = 64, desc: str = "features") -> tuple[np.ndarray, int]:
    """Base features of rows `index` of the image cache into `path` (.npy, float32, memory-mapped),
    written batch by batch; a `.progress.json` beside it makes an interrupted extraction resume
    where it stopped. Returns (features memory-mapped read-only, rows computed in this call)."""
    import json

    from pipeline.model.backbones import quiet_tf
    from pipeline.progress import progress
    from submissions.files import atomic_write_text

    tf = quiet_tf()
    path = Path(path)
    marker = path.with_name(path.stem + ".progress.json")
    shape = (len(index), *(int(d) for d in extractor.output.shape[1:]))
    if len(index) == 0:
        return np.zeros(shape, np.float32), 0
    done = 0
    if path.exists() and marker.exists():
        arr = np.load(path, mmap_mode="r+")
        done = int(json.loads(marker.read_text()).get("rows", 0)) if arr.shape == shape else 0
        if arr.shape != shape:
            arr = None
    elif path.exists() and np.load(path, mmap_mode="r").shape == shape:
        return np.load(path, mmap_mode="r"), 0  # complete (no marker left)
    else:
        arr = None
    if arr is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"rows": 0}))  # first: a file without a marker is complete
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    start = done
    if done < len(index):
        infer = tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
        ds = image_dataset(images, None, np.asarray(index)[done:], batch_size=batch_size)
        last = done
        for x in progress(ds, total=-(-(len(index) - done) // batch_size), desc=desc):
            y = np.asarray(infer(x), dtype=np.float32)
            arr[done:done + len(y)] = y
            done += len(y)
            if done - last >= 2048 or done == len(index):
                arr.flush()
                atomic_write_text(marker, json.dumps({"rows": done}))
                last = done
    arr.flush()
    del arr
    marker.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), done - start
