"""Backbones and heads: VGG16, VGG19, ResNet50 from `keras.applications` with the study's heads.

A model takes RGB images as float 0–255 (H×W×3) and returns class probabilities (float32,
whatever the mixed-precision policy). Its layers, in order:

    input → `BackbonePreprocess` (ImageNet "caffe" preprocessing, inside the model so a saved
    model needs no outside code) → the base (a nested `keras.Model`) → the head:

    vgg16:    Flatten → Dense(256, relu) → Dense(256, relu) "embedding" → Dense(n, softmax)
    vgg19:    Flatten → Dense(1024, relu) → Dense(1024, relu) "embedding" → Dense(n, softmax)
    resnet50: GlobalAveragePooling "embedding" → Dropout(0.5) → Dense(n, softmax)

The layer named "embedding" is the penultimate global descriptor `glr predict --embeddings` saves.
The head options (`glr train --head/--pooling/--embedding-dim`, `HEAD_KEYS`) change this head:
`pooling` avg|gem replaces Flatten (vgg) or the average pooling (resnet50) with "head_pool"
(GeM: pipeline.model.heads); `embedding_dim` > 0 adds a neck Dense(dim) "head_neck" →
BatchNormalization, and the BatchNormalization becomes "embedding"; `head = arcface` replaces the
softmax Dense with ArcFace cosines "arcface" → softmax(s·cos) "predictions" (the margin is in the
training loss only; see pipeline.model.heads).

BatchNorm (ResNet50's base) never learns here, in either phase: its layers keep
`trainable = False` (`unfreeze_top` skips them), and a Keras 3 BatchNormalization that is not
trainable runs in inference mode — moving mean/variance, gamma and beta all unchanged. The
`training=False` written when the base is called inside the model does *not* protect it: Keras 3
functional models pass the outer call's `training=True` (from `fit`) down to every layer.
The head is also built on its own (`build_head`) over cached base features: the bottleneck phase
trains it there and copies its weights into the full model by layer name.

TensorFlow/Keras are imported inside functions so importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from pipeline.options import BACKBONES, PRECISIONS
from submissions.errors import UserError

_POLICY = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16", "fp32": "float32"}
HEAD_LAYERS = ("head_flatten", "head_pool", "head_fc1", "head_fc2", "head_dropout", "head_neck", "embedding",
               "arcface", "predictions")
MIN_SIZE = 32


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence C++ start-up chatter (absl INFO lines, cuInit on GPU-less machines) written to fd 2
    before TensorFlow reads TF_CPP_MIN_LOG_LEVEL; Python exceptions still surface afterwards.
    Set TF_CPP_MIN_LOG_LEVEL=0 to see everything."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") < "2":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_GPUS: list | None = None


def quiet_tf():
    """Import TensorFlow with its C++ logging turned down; return the module."""
    global _GPUS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _GPUS is None:
        with _quiet_stderr_fd():
            import tensorflow as tf

            _GPUS = tf.config.list_physical_devices("GPU")
        tf.get_logger().setLevel("ERROR")  # e.g. retracing notices when predict runs several times
    import tensorflow as tf

    return tf


def gpus() -> list:
    """The visible GPUs (listed once, quietly)."""
    quiet_tf()
    return list(_GPUS or [])


def _register():
    """Define (once) the custom preprocessing layer, registered so `.keras` files load anywhere."""
    global BackbonePreprocess
    if "BackbonePreprocess" in globals():
        return BackbonePreprocess
    quiet_tf()
    import keras

    @keras.saving.register_keras_serializable(package="glr")
    class BackbonePreprocess(keras.layers.Layer):
        """ImageNet 'caffe' preprocessing (RGB→BGR, minus the ImageNet mean) used by all three bases."""

        def __init__(self, mode: str = "caffe", **kwargs):
            super().__init__(**kwargs)
            self.mode = mode

        def call(self, x):
            x = keras.ops.cast(x, self.compute_dtype)
            mean = keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=self.compute_dtype)
            return keras.ops.flip(x, axis=-1) - mean

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    globals()["BackbonePreprocess"] = BackbonePreprocess
    return BackbonePreprocess


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str = "auto") -> str:
    """'auto' → fp16 on a GPU, bf16 on CPUs with AMX or AVX512-BF16, else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if gpus():
        return "fp16"
    flags = cpu_flags()
    if {"amx_bf16", "avx512_bf16"} & flags:
        return "bf16"
    return "fp32"


def set_precision(precision: str) -> str:
    """Set Keras' global mixed-precision policy; return the resolved precision name."""
    resolved = resolve_precision(precision)
    quiet_tf()
    import keras

    keras.mixed_precision.set_global_policy(_POLICY[resolved])
    return resolved


MULTI_WORKER_ISSUE = "https://github.com/keras-team/keras/issues/20585"


def check_single_machine() -> None:
    """Refuse TF_CONFIG (training on several machines): Keras 3 `fit` fails under
    MultiWorkerMirroredStrategy (keras-team/keras#20585), and workers sharing --out would delete
    each other's files."""
    if os.environ.get("TF_CONFIG"):
        raise UserError("TF_CONFIG is set: training on several machines (MultiWorkerMirroredStrategy) does not work "
                        f"with Keras 3's fit ({MULTI_WORKER_ISSUE}); unset TF_CONFIG and train on one machine — "
                        "several GPUs in it are used automatically (MirroredStrategy)")


def get_strategy():
    """Mirrored with >1 GPU, else the default strategy; TF_CONFIG is refused (`check_single_machine`)."""
    check_single_machine()
    tf = quiet_tf()
    if len(gpus()) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _check(backbone: str, image_size: int) -> None:
    if backbone not in BACKBONES:
        raise UserError(f"--backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if int(image_size) < MIN_SIZE:
        raise UserError(f"--image-size {image_size}: must be at least {MIN_SIZE} pixels for {backbone}")


def build_base(backbone: str, image_size: int = 96, weights: str | None = "imagenet"):
    """The convolutional base without its top. `weights`: 'imagenet', 'none'/None, or a file path.

    'imagenet' is keras.applications' own download (cached in ~/.keras/models); offline it fails
    and the failure becomes a UserError suggesting --weights none or a local file. A path is
    handed to keras.applications as well (a `.weights.h5` of the base, or Keras' `_notop.h5`).
    """
    _check(backbone, image_size)
    quiet_tf()
    import keras

    ctor = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19,
            "resnet50": keras.applications.ResNet50}[backbone]
    w = None if weights in (None, "none", "") else weights
    if w not in (None, "imagenet"):
        path = Path(w)
        if not path.is_file():
            raise UserError(f"--weights {w}: no such file (use imagenet, none, or a weights file of the "
                            f"{backbone} base without its top, e.g. saved with base.save_weights('x.weights.h5'))")
        w = str(path)
    shape = (int(image_size), int(image_size), 3)
    try:
        return ctor(include_top=False, weights=w, input_shape=shape)
    except UserError:
        raise
    except Exception as e:  # download failure, bad file, shape mismatch: keras raises many types
        if w == "imagenet":
            raise UserError(f"--weights imagenet: cannot get the ImageNet weights of {backbone} ({_short(e)}); "
                            "this machine may be offline — put the file in ~/.keras/models, pass "
                            "--weights PATH to a local copy, or --weights none to train from scratch") from None
        raise UserError(f"--weights {w}: cannot load into the {backbone} base at {image_size} px "
                        f"({_short(e)})") from None


def _short(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


HEAD_KEYS = ("head", "pooling", "embedding_dim", "arcface_scale", "arcface_subcentres")


def head_spec(options: dict) -> dict:
    """The head-building options (`HEAD_KEYS`) of a train config; absent keys (runs of older glr)
    take the schema's defaults, i.e. the study's softmax heads."""
    from pipeline.options import TRAIN

    return {k: options.get(k, TRAIN.default(k)) for k in HEAD_KEYS}


def _pool(kind: str, x, name: str):
    import keras

    if kind == "gem":
        from pipeline.model.heads import register

        return register()["GeM"](name=name)(x)
    return keras.layers.GlobalAveragePooling2D(name=name)(x)


def _head(backbone: str, n_classes: int, x, head: str = "softmax", pooling: str = "auto", embedding_dim: int = 0,
          arcface_scale: float = 30.0, arcface_subcentres: int = 1):
    """Apply the backbone's head to tensor `x` (see the module docstring); return the probabilities tensor."""
    import keras

    L = keras.layers
    neck = int(embedding_dim) > 0
    if backbone in ("vgg16", "vgg19"):
        width = 256 if backbone == "vgg16" else 1024
        x = L.Flatten(name="head_flatten")(x) if pooling == "auto" else _pool(pooling, x, "head_pool")
        x = L.Dense(width, activation="relu", name="head_fc1")(x)
        x = L.Dense(width, activation="relu", name="head_fc2" if neck else "embedding")(x)
    else:
        x = _pool("avg" if pooling == "auto" else pooling, x, "head_pool" if neck else "embedding")
        x = L.Dropout(0.5, name="head_dropout")(x)
    if neck:
        x = L.Dense(int(embedding_dim), name="head_neck")(x)
        x = L.BatchNormalization(name="embedding")(x)
    if head == "arcface":
        from pipeline.model.heads import register

        layers = register()
        cos = layers["ArcFace"](n_classes, arcface_subcentres, arcface_scale, name="arcface")(x)
        return layers["ScaledSoftmax"](arcface_scale, name="predictions")(cos)
    return L.Dense(int(n_classes), activation="softmax", dtype="float32", name="predictions")(x)


def build_model(backbone: str, n_classes: int, image_size: int = 96, weights: str | None = "imagenet", **head):
    """The full classifier (see the module docstring) under the current precision policy;
    `head`: the head options (`HEAD_KEYS`; default the study's softmax head)."""
    if int(n_classes) < 2:
        raise UserError(f"need at least 2 classes to train a classifier, got {n_classes}")
    _register()
    import keras

    base = build_base(backbone, image_size, weights)
    base.trainable = False
    inputs = keras.Input(shape=(int(image_size), int(image_size), 3), name="image")
    x = globals()["BackbonePreprocess"](name="preprocess")(inputs)
    x = base(x, training=False)
    return keras.Model(inputs, _head(backbone, n_classes, x, **head), name=f"glr_{backbone}")


def find_base(model):
    """The nested base model inside a full model."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"{model.name}: no nested base model")


def feature_shape(model) -> tuple[int, ...]:
    return tuple(int(d) for d in find_base(model).output.shape[1:])


def build_head(backbone: str, n_classes: int, feature_shape: tuple[int, ...], **head):
    """The head alone, on base features (for training over cached bottleneck features)."""
    _register()
    import keras

    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    return keras.Model(inputs, _head(backbone, n_classes, inputs, **head), name=f"head_{backbone}")


def feature_extractor(model):
    """A model image → base features, sharing `model`'s preprocessing and base."""
    import keras

    inputs = keras.Input(shape=tuple(model.input.shape[1:]))
    x = model.get_layer("preprocess")(inputs)
    return keras.Model(inputs, find_base(model)(x, training=False))


def copy_head(src, dst) -> None:
    """Copy the head's weights from one model to another, matched by layer name."""
    names = {l.name for l in dst.layers}
    for layer in src.layers:
        if layer.name in HEAD_LAYERS and layer.name in names and layer.weights:
            dst.get_layer(layer.name).set_weights(layer.get_weights())


def unfreeze_top(model, n_layers: int) -> int:
    """Make the top `n_layers` weighted layers of the base trainable; BatchNorm layers among them
    stay `trainable = False`, which keeps them in inference mode (see the module docstring).
    Return how many layers were unfrozen."""
    import keras

    base = find_base(model)
    base.trainable = True
    weighted = [l for l in base.layers if l.weights]
    top = weighted[-n_layers:] if n_layers > 0 else []
    for layer in base.layers:
        layer.trainable = layer in top and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(1 for l in top if l.trainable)


def load_model(path: str | os.PathLike, compile: bool = False):
    """Load a `.keras` model written by `glr train` (registers the custom layers first).
    `compile=True` restores the optimizer and its state too (for --resume)."""
    from pipeline.model.heads import register

    _register()
    register()
    import keras

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model file (train one with `glr train`)")
    return keras.models.load_model(path, compile=compile)
