"""Metric-learning layers: GeM pooling, the (sub-centre) ArcFace head and its margin loss.

ArcFace (Deng et al. 2019) trains the classifier on the *cosines* between the L2-normalised
embedding and L2-normalised class centres, with an additive angular margin m on the true class:
logit_y = s·cos(θ_y + m), logit_j = s·cos θ_j (j ≠ y). Sub-centre ArcFace keeps k centres per class
and uses the largest cosine of each class, so noisy classes may spread over several centres.

How the margin reaches the labels while `model.keras` stays a single-input model for predict:

    … → "embedding" → `ArcFace` "arcface" (cosines, one per class; float32)
                    → `ScaledSoftmax` "predictions" (softmax(s·cos), no margin: the probabilities)

The margin needs the labels, so it lives in the loss (`ArcFaceLoss`), not in the model. Training
fits a *view* of the model that ends at "arcface" (`training_view`: same layers, same variables,
output the cosines) compiled with `ArcFaceLoss(m, s)`; accuracy is the argmax of the cosines, i.e.
the prediction. The saved model ends at "predictions", so `glr predict` reads class probabilities
and the embedding as for a softmax model. `with_predictions` puts the weightless "predictions"
layer back on a view loaded from a checkpoint. This works unchanged on cached bottleneck features
(the view of the head-only model) and under MirroredStrategy (a plain Keras loss).

The layers are registered Keras serializables (package "glr"), so `.keras` files load anywhere
once this module's `register()` ran (`pipeline.model.backbones.load_model` does it).
"""
from __future__ import annotations

import math

_DONE: dict = {}


def register() -> dict:
    """Define (once) the custom layers and loss; return them by name."""
    if _DONE:
        return _DONE
    from pipeline.model.backbones import quiet_tf

    quiet_tf()
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="glr")
    class GeM(keras.layers.Layer):
        """Generalised-mean pooling over H×W: (mean of clamp(x, eps)^p)^(1/p), p learnable (init 3).
        p = 1 is average pooling, p → ∞ max pooling. Computed in float32 whatever the policy (x^p
        overflows float16); the output has the layer's compute dtype, so the "embedding" layer keeps
        the model's policy (predict reads the precision from it)."""

        def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
            kwargs.setdefault("autocast", False)
            super().__init__(**kwargs)
            self.p_init, self.eps = float(p), float(eps)

        def build(self, input_shape):
            self.p = self.add_weight(name="p", shape=(), dtype="float32",
                                     initializer=keras.initializers.Constant(self.p_init), trainable=True)

        def call(self, x):
            x = ops.cast(x, "float32")
            p = ops.cast(self.p, "float32")
            pooled = ops.mean(ops.power(ops.maximum(x, self.eps), p), axis=(1, 2))
            return ops.cast(ops.power(pooled, 1.0 / p), self.compute_dtype)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], input_shape[-1])

        def get_config(self):
            return {**super().get_config(), "p": self.p_init, "eps": self.eps}

    @keras.saving.register_keras_serializable(package="glr")
    class ArcFace(keras.layers.Layer):
        """Cosines between the L2-normalised input and `n_classes`×`subcentres` L2-normalised centres;
        per class the largest over its sub-centres. Output (batch, n_classes) in float32. `scale`
        is kept here for `ScaledSoftmax`/`ArcFaceLoss` (it does not change the output)."""

        def __init__(self, n_classes: int, subcentres: int = 1, scale: float = 30.0, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.n_classes, self.subcentres, self.scale = int(n_classes), int(subcentres), float(scale)

        def build(self, input_shape):
            self.centres = self.add_weight(name="centres", shape=(int(input_shape[-1]),
                                                                  self.n_classes * self.subcentres),
                                           initializer="glorot_uniform", trainable=True)

        def call(self, x):
            x = ops.cast(x, "float32")
            x = x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))
            w = ops.cast(self.centres, "float32")
            w = w / ops.sqrt(ops.maximum(ops.sum(w * w, axis=0, keepdims=True), 1e-12))
            cos = ops.matmul(x, w)
            if self.subcentres > 1:
                cos = ops.max(ops.reshape(cos, (-1, self.n_classes, self.subcentres)), axis=-1)
            return ops.clip(cos, -1.0, 1.0)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.n_classes)

        def get_config(self):
            return {**super().get_config(), "n_classes": self.n_classes, "subcentres": self.subcentres,
                    "scale": self.scale}

    @keras.saving.register_keras_serializable(package="glr")
    class ScaledSoftmax(keras.layers.Layer):
        """softmax(scale · cosines): ArcFace's class probabilities at inference (no margin)."""

        def __init__(self, scale: float = 30.0, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.scale = float(scale)

        def call(self, cos):
            return ops.softmax(ops.cast(cos, "float32") * self.scale, axis=-1)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    @keras.saving.register_keras_serializable(package="glr")
    class ArcFaceLoss(keras.losses.Loss):
        """Cross-entropy of s·cos with the additive angular margin m on the true class only:
        cos(θ+m) where θ+m ≤ π, else cos θ − m·sin m (insightface's fallback keeps it monotonic)."""

        def __init__(self, margin: float = 0.3, scale: float = 30.0, name: str = "arcface_loss", **kwargs):
            super().__init__(name=name, **kwargs)
            self.margin, self.scale = float(margin), float(scale)

        def call(self, y_true, y_pred):
            logits = margin_logits(ops, y_true, y_pred, self.margin, self.scale)
            y = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

        def get_config(self):
            return {**super().get_config(), "margin": self.margin, "scale": self.scale}

    _DONE.update(GeM=GeM, ArcFace=ArcFace, ScaledSoftmax=ScaledSoftmax, ArcFaceLoss=ArcFaceLoss)
    return _DONE


def margin_logits(ops, y_true, cos, margin: float, scale: float):
    """s · (cos with cos(θ+m) at each row's true class). `ops`: keras.ops (or a numpy shim)."""
    cos = ops.cast(cos, "float32")
    y = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    onehot = ops.one_hot(y, ops.shape(cos)[-1], dtype="float32")
    sin = ops.sqrt(ops.clip(1.0 - cos * cos, 0.0, 1.0))
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    phi = ops.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    return scale * (onehot * phi + (1.0 - onehot) * cos)


def training_view(model):
    """The model to fit: for an ArcFace model a view ending at its cosines ("arcface"), sharing
    every layer and variable; a softmax model is its own view."""
    import keras

    names = {layer.name for layer in model.layers}
    if "arcface" not in names:
        return model
    return keras.Model(model.input, model.get_layer("arcface").output, name=f"{model.name}_train")


def with_predictions(view):
    """The full model of a training view (adds the weightless "predictions" layer); a model that
    already ends in "predictions" is returned as is."""
    import keras

    if view.layers[-1].name != "arcface":
        return view
    arc = view.layers[-1]
    probs = register()["ScaledSoftmax"](arc.scale, name="predictions")(view.output)
    return keras.Model(view.input, probs, name=view.name.removesuffix("_train"))


def compile_for(model, optimizer, *, head: str, margin: float, scale: float) -> None:
    """Compile `model` (a training view) with the loss of its head and accuracy."""
    loss = register()["ArcFaceLoss"](margin, scale) if head == "arcface" else "sparse_categorical_crossentropy"
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
