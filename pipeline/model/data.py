"""The training input pipeline: train.csv + image paths → shared decoded-image cache → tf.data.

Images are decoded once (Pillow via `pipeline.images.open_rgb`, so palette/CMYK/16-bit/EXIF
photos all work), resized to a square and appended as uint8 S×S×3 rows to the competition's
decoded-image store (`pipeline.caches.RowStore` under `<cache root>/images/<S>px/`), shared by
every model, both fits of a run (the local-validation folder's images are links to the same
files) and later runs. Decoding validates every image: a corrupt or missing file gives a warning
naming its id and is left out (and counted in the run manifest) — training never meets it
mid-epoch. Epochs then read the store (memory-mapped) through `tf.data`: shuffle, batch, the
study's augmentation as Keras preprocessing layers / tf ops, prefetch. With a frozen base the
base's features (the bottleneck) are stored the same way, float16, keyed by the base's weights,
the size and the precision as well as the image (`bottleneck_features`).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError

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


IMAGES_FORMAT = 1  # bump when load_square's output changes: old decoded rows are then never read


def image_store(root: str | os.PathLike, size: int):
    """The shared decoded-image store of one size under the cache root."""
    from pipeline.caches import RowStore, kind_dir

    return RowStore(kind_dir(root, "images") / f"{int(size)}px", kind="images",
                    key={"size": int(size), "decoder": IMAGES_FORMAT}, dtype="uint8", row_shape=(size, size, 3))


def decode_images(ids: list[str], paths: list[Path], size: int, root: str | os.PathLike, *,
                  desc: str = "decode") -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict], dict]:
    """Each image as a row of the shared decoded-image store under `root`, decoding only the ones
    it lacks (appended; the count and bytes are printed first, and refused if the disk is short).

    Returns (store rows memory-mapped read-only, row of each image or -1 when it is skipped, the
    images' file keys, skipped [{id, path, reason}], stats {store, decoded, cached, failed}).
    """
    from pipeline.caches import announce, file_keys
    from pipeline.progress import progress

    store = image_store(root, size)
    keys = file_keys(paths)
    present = keys != b""
    rows, reasons = store.lookup(keys)
    todo = np.flatnonzero(present & (rows < 0) & np.array([r is None for r in reasons], bool))
    uniq, first = np.unique(keys[todo], return_index=True)
    todo = todo[first]  # one decode per file, however many rows name it
    decoded = 0
    if len(todo):
        with store.appending() as app:
            have, failed = app.lookup(keys[todo])  # another process may have added some meanwhile
            todo = todo[(have < 0) & (failed < 0)]
            announce(store.folder, "decoded-image", len(todo), app.idx.n_rows, store.row_bytes)
            sub = [paths[i] for i in todo]
            for j, arr, reason in progress(iter_decoded(sub, size), total=len(sub), desc=desc):
                if arr is None:
                    app.add_failed(keys[todo[j]], reason)
                else:
                    app.add(keys[todo[j]], arr)
            decoded = app.added
        rows, reasons = store.lookup(keys)
    store.touch()
    skipped = []
    for i in np.flatnonzero(rows < 0):
        reason = "file missing" if not present[i] else (reasons[i] or "cannot decode")
        skipped.append({"id": ids[i], "path": str(paths[i]), "reason": reason})
    warn_skipped(skipped)
    stats = {"store": str(store.folder), "decoded": int(decoded), "cached": int((rows >= 0).sum()) - int(decoded),
             "skipped": len(skipped), "row_bytes": store.row_bytes}
    return store.array(), rows, keys, skipped, stats


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


def image_dataset(array: np.ndarray, labels: np.ndarray | None, index: np.ndarray, *, batch_size: int,
                  shuffle: bool = False, augment=None, seed: int = 0, repeat: bool = False):
    """tf.data over rows `index` of a (memory-mapped) array — a cache store's rows: shuffle → batch
    → gather → augment → prefetch. `labels[j]` is the label of row `index[j]`. Yields float32
    batches (and int32 labels)."""
    from pipeline.model.backbones import quiet_tf

    tf = quiet_tf()
    index = np.asarray(index, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices(np.arange(len(index), dtype=np.int64))
    if shuffle:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    shape = tuple(array.shape[1:])
    lab = None if labels is None else np.asarray(labels, dtype=np.int32)
    if lab is not None and len(lab) != len(index):
        raise ValueError(f"{len(lab)} labels for {len(index)} rows")

    def gather(pos):
        rows = index[np.asarray(pos)]
        order = np.argsort(rows)  # sorted reads from the memory map, then back to batch order
        x = np.empty((len(rows), *shape), dtype=np.float32)
        x[order] = array[rows[order]]
        return (x, lab[pos]) if lab is not None else x

    if lab is not None:
        def load(pos):
            x, y = tf.numpy_function(gather, [pos], [tf.float32, tf.int32])
            x.set_shape((None, *shape))
            y.set_shape((None,))
            return x, y
    else:
        def load(pos):
            x = tf.numpy_function(gather, [pos], tf.float32)
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


def weights_digest(model) -> str:
    """A short hash of a model's weight values: the identity of a base whatever its origin
    (ImageNet download, a file, or a seeded random start)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w))
        h.update(f"{w.path}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def bottleneck_store(root: str | os.PathLike, *, backbone: str, base_digest: str, image_size: int,
                     precision: str, feature_shape: tuple[int, ...]):
    """The shared store of frozen-base features (float16) for one base, size and precision."""
    from pipeline.caches import RowStore, kind_dir

    key = {"backbone": backbone, "base_weights": base_digest, "image_size": int(image_size),
           "precision": precision, "decoder": IMAGES_FORMAT}
    name = f"{backbone}-{int(image_size)}px-{precision}-{base_digest[:12]}"
    return RowStore(kind_dir(root, "bottleneck") / name, kind="bottleneck", key=key, dtype="float16",
                    row_shape=tuple(feature_shape))


def bottleneck_features(extractor, store, images: np.ndarray, image_rows: np.ndarray, keys: np.ndarray, *,
                        batch_size: int = 64, desc: str = "features") -> tuple[np.ndarray, np.ndarray, int]:
    """Base features of the images at `image_rows` of the decoded-image store, looked up in (or
    computed into) the bottleneck `store` by the images' file `keys`. Returns (the store's rows
    memory-mapped, each image's feature row, rows computed in this call). Features are stored
    float16 (clipped to its range); an interrupted extraction keeps what was committed."""
    from pipeline.caches import announce
    from pipeline.model.backbones import quiet_tf
    from pipeline.progress import progress

    tf = quiet_tf()
    image_rows, keys = np.asarray(image_rows, np.int64), np.asarray(keys)
    rows, _ = store.lookup(keys)
    computed = 0
    if (rows < 0).any():
        with store.appending() as app:
            have, _ = app.lookup(keys)
            _, first = np.unique(keys[have < 0], return_index=True)
            todo = np.flatnonzero(have < 0)[first]
            announce(store.folder, "bottleneck", len(todo), app.idx.n_rows, store.row_bytes)
            infer = tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
            ds = image_dataset(images, None, image_rows[todo], batch_size=batch_size)
            limit = float(np.finfo(np.float16).max)
            done = 0
            for x in progress(ds, total=-(-len(todo) // batch_size), desc=desc):
                y = np.clip(np.asarray(infer(x), dtype=np.float32), -limit, limit)
                for j in range(len(y)):
                    app.add(keys[todo[done + j]], y[j])
                done += len(y)
            computed = app.added
        rows, _ = store.lookup(keys)
    store.touch()
    return store.array(), rows, computed
