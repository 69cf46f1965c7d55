"""Keras segmentation networks: U-Net (2D/3D), VGG16-encoder U-Net, Dense U-Net, optional CBAM.

Every builder is a plain function ``builder(config) -> keras.Model`` using the functional API, so the
model serialises to ``.keras`` and reloads with ``safe_mode=True`` (no ``Lambda`` layers; the only
custom layer, :class:`CBAM`, is registered under the ``medsegai`` package).

Tensor layouts (channels-last, as everywhere in MedSegAI's Keras code):

* 2D input ``(N, y, x, C)``, output ``(N, y, x, K)``;
* 3D input ``(N, z, y, x, C)``, output ``(N, z, y, x, K)``;

with ``C = config["in_channels"]`` and ``K = config["num_classes"]`` (``len(labels) + 1``; class index
== label value, 0 is background). Spatial input dimensions are ``None``: any size divisible by
:func:`divisible_by` works, so the engine's sliding windows can use any such patch. The output is a
softmax in ``float32`` even under a ``mixed_float16`` policy (final layer ``probabilities`` has
``dtype="float32"``).

Layer naming contract (used by :func:`freeze_encoder` and :func:`adapt_from_parent`):

* ``image`` — the input layer;
* ``enc_*`` — encoder layers (including the VGG16 blocks ``enc_block<b>_conv<i>`` and the
  ``enc_adapter`` 1x1 convolution that maps ``C != 3`` channels to VGG16's 3);
* ``bottleneck_*`` — the deepest block; ``dec_*`` — decoder layers;
* ``head_conv`` — the final 1x1 convolution producing ``K`` logits (output channel ``k`` == label
  value ``k``); ``probabilities`` — the float32 softmax.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.model.keras_layers import CBAM

from .config import BUILDERS

__all__ = [
    "BUILDERS",
    "CBAM",
    "DEFAULT_CONFIGS",
    "adapt_from_parent",
    "build_model",
    "dense_unet_2d",
    "divisible_by",
    "freeze_encoder",
    "label_values",
    "resolve_config",
    "unet_2d",
    "unet_3d",
    "vgg16_unet_2d",
]

_COMMON_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "num_classes": 2,
    "norm": "batch",
    "activation": "relu",
    "dropout": 0.0,
    "attention": None,
    "cbam_reduction": 8,
    "cbam_kernel_size": 7,
}

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "unet_2d": {
        "builder": "unet_2d",
        **_COMMON_DEFAULTS,
        "depth": 4,
        "base_filters": 32,
        "filter_multiplier": 2.0,
        "max_filters": 512,
        "convs_per_block": 2,
        "kernel_size": 3,
        "residual": False,
    },
    "unet_3d": {
        "builder": "unet_3d",
        **_COMMON_DEFAULTS,
        "depth": 4,
        "base_filters": 16,
        "filter_multiplier": 2.0,
        "max_filters": 320,
        "convs_per_block": 2,
        "kernel_size": 3,
        "residual": False,
    },
    "vgg16_unet_2d": {
        "builder": "vgg16_unet_2d",
        **_COMMON_DEFAULTS,
        "depth": 4,
        "encoder_weights": None,
        "frozen_blocks": 2,
        "decoder_filters": None,
        "convs_per_block": 2,
        "kernel_size": 3,
        "residual": False,
    },
    "dense_unet_2d": {
        "builder": "dense_unet_2d",
        **_COMMON_DEFAULTS,
        "depth": 4,
        "base_filters": 32,
        "growth_rate": 16,
        "layers_per_block": 4,
        "compression": 0.5,
    },
}
"""Complete default configuration of every builder. ``resolve_config`` fills missing keys from here."""

_NORMS = ("batch", "instance", "none")
_ACTIVATIONS = ("relu", "leaky_relu", "elu")
_ATTENTIONS = (None, "none", "cbam")
# (block index, number of convolutions, filters) of keras.applications.VGG16.
_VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _check_int(config: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None) -> int:
    value = config[key]
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or too_big:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"model config {key!r} must be an integer {bound}, got {value!r}")
    return value


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the complete, validated configuration of a builder (defaults filled in).

    The result is what belongs in ``model.json`` under ``architecture.config``: calling
    :func:`build_model` on it rebuilds the same network.

    Args:
        config: at least ``{"builder": name}``; any key of ``DEFAULT_CONFIGS[name]`` may be given.

    Returns:
        A new dict with every key of the builder's defaults.

    Raises:
        TypeError: ``config`` is not a mapping.
        ValueError: unknown builder, unknown key, or a value out of range (the message names it).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"model config must be a mapping, got {type(config).__name__}")
    builder = config.get("builder")
    if builder not in DEFAULT_CONFIGS:
        raise ValueError(f"model config 'builder' must be one of {sorted(DEFAULT_CONFIGS)}, got {builder!r}")
    defaults = DEFAULT_CONFIGS[builder]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {builder} config; allowed: {sorted(defaults)}")
    cfg = copy.deepcopy(dict(defaults))
    cfg.update(copy.deepcopy(dict(config)))

    _check_int(cfg, "in_channels", 1)
    _check_int(cfg, "num_classes", 2, 256)
    if cfg["norm"] not in _NORMS:
        raise ValueError(f"model config 'norm' must be one of {_NORMS}, got {cfg['norm']!r}")
    if cfg["activation"] not in _ACTIVATIONS:
        raise ValueError(f"model config 'activation' must be one of {_ACTIVATIONS}, got {cfg['activation']!r}")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"model config 'dropout' must be a number in [0, 1), got {dropout!r}")
    if cfg["attention"] not in _ATTENTIONS:
        raise ValueError(f"model config 'attention' must be one of {_ATTENTIONS}, got {cfg['attention']!r}")
    if cfg["attention"] == "none":
        cfg["attention"] = None
    _check_int(cfg, "cbam_reduction", 1)
    _check_int(cfg, "cbam_kernel_size", 1)
    if cfg["cbam_kernel_size"] % 2 == 0:
        raise ValueError(f"model config 'cbam_kernel_size' must be odd, got {cfg['cbam_kernel_size']!r}")

    if builder in ("unet_2d", "unet_3d"):
        _check_int(cfg, "depth", 1, 8)
        _check_int(cfg, "base_filters", 1)
        _check_int(cfg, "max_filters", 1)
        _check_int(cfg, "convs_per_block", 1)
        _check_int(cfg, "kernel_size", 1)
        mult = cfg["filter_multiplier"]
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 1.0 <= mult <= 4.0:
            raise ValueError(f"model config 'filter_multiplier' must be a number in [1, 4], got {mult!r}")
        if not isinstance(cfg["residual"], bool):
            raise ValueError(f"model config 'residual' must be true or false, got {cfg['residual']!r}")
    elif builder == "vgg16_unet_2d":
        _check_int(cfg, "depth", 1, 4)
        _check_int(cfg, "frozen_blocks", 0, 5)
        _check_int(cfg, "convs_per_block", 1)
        _check_int(cfg, "kernel_size", 1)
        if not isinstance(cfg["residual"], bool):
            raise ValueError(f"model config 'residual' must be true or false, got {cfg['residual']!r}")
        dec = cfg["decoder_filters"]
        if dec is not None:
            if (
                not isinstance(dec, (list, tuple))
                or len(dec) != cfg["depth"]
                or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in dec)
            ):
                raise ValueError(
                    f"model config 'decoder_filters' must be null or a list of {cfg['depth']} positive integers "
                    f"(full resolution first), got {dec!r}"
                )
            cfg["decoder_filters"] = list(dec)
        weights = cfg["encoder_weights"]
        if weights is not None:
            if not isinstance(weights, (str, os.PathLike)):
                raise ValueError(f"model config 'encoder_weights' must be null or a local file path, got {weights!r}")
            weights = os.fspath(weights)
            if weights == "imagenet" or "://" in weights:
                raise MedSegAIInputError(
                    f"encoder_weights {weights!r} would need a download; give the path of a local VGG16 "
                    "no-top weights file (e.g. vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5) or null."
                )
            cfg["encoder_weights"] = weights
    elif builder == "dense_unet_2d":
        _check_int(cfg, "depth", 1, 8)
        _check_int(cfg, "base_filters", 1)
        _check_int(cfg, "growth_rate", 1)
        _check_int(cfg, "layers_per_block", 1)
        comp = cfg["compression"]
        if isinstance(comp, bool) or not isinstance(comp, (int, float)) or not 0.0 < comp <= 1.0:
            raise ValueError(f"model config 'compression' must be a number in (0, 1], got {comp!r}")
    return cfg


def divisible_by(config: Mapping[str, Any]) -> int:
    """Spatial size every input dimension must be divisible by (``2 ** depth``)."""
    return 2 ** resolve_config(config)["depth"]


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def _layers(ndim: int) -> dict[str, Callable[..., keras.layers.Layer]]:
    if ndim == 2:
        return {
            "conv": keras.layers.Conv2D,
            "up": keras.layers.Conv2DTranspose,
            "pool": keras.layers.MaxPooling2D,
            "drop": keras.layers.SpatialDropout2D,
        }
    return {
        "conv": keras.layers.Conv3D,
        "up": keras.layers.Conv3DTranspose,
        "pool": keras.layers.MaxPooling3D,
        "drop": keras.layers.SpatialDropout3D,
    }


def _norm(x: Any, cfg: Mapping[str, Any], name: str) -> Any:
    if cfg["norm"] == "batch":
        return keras.layers.BatchNormalization(name=name)(x)
    if cfg["norm"] == "instance":
        return keras.layers.GroupNormalization(groups=-1, name=name)(x)
    return x


def _act(x: Any, cfg: Mapping[str, Any], name: str) -> Any:
    return keras.layers.Activation(cfg["activation"], name=name)(x)


def _attention(x: Any, cfg: Mapping[str, Any], prefix: str) -> Any:
    if cfg["attention"] == "cbam":
        return CBAM(cfg["cbam_reduction"], cfg["cbam_kernel_size"], name=f"{prefix}_cbam")(x)
    return x


def _dropout(x: Any, cfg: Mapping[str, Any], ndim: int, prefix: str) -> Any:
    if cfg["dropout"] > 0:
        return _layers(ndim)["drop"](cfg["dropout"], name=f"{prefix}_drop")(x)
    return x


def _conv_block(x: Any, filters: int, cfg: Mapping[str, Any], ndim: int, prefix: str) -> Any:
    """``convs_per_block`` x (conv -> norm -> activation), optional residual, CBAM and dropout."""
    conv = _layers(ndim)["conv"]
    shortcut = x
    n = cfg["convs_per_block"]
    for j in range(1, n + 1):
        x = conv(
            filters,
            cfg["kernel_size"],
            padding="same",
            use_bias=cfg["norm"] == "none",
            kernel_initializer="he_normal",
            name=f"{prefix}_conv{j}",
        )(x)
        x = _norm(x, cfg, f"{prefix}_norm{j}")
        if cfg["residual"] and j == n:
            if shortcut.shape[-1] != filters:
                shortcut = conv(filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{prefix}_proj")(
                    shortcut
                )
                shortcut = _norm(shortcut, cfg, f"{prefix}_proj_norm")
            x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
        x = _act(x, cfg, f"{prefix}_act{j}")
    x = _attention(x, cfg, prefix)
    return _dropout(x, cfg, ndim, prefix)


def _head(x: Any, cfg: Mapping[str, Any], ndim: int) -> Any:
    x = _layers(ndim)["conv"](cfg["num_classes"], 1, name="head_conv")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _input(cfg: Mapping[str, Any], ndim: int) -> Any:
    return keras.Input(shape=(None,) * ndim + (cfg["in_channels"],), name="image")


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------
def _unet(config: Mapping[str, Any], ndim: int, builder: str) -> keras.Model:
    cfg = resolve_config({**config, "builder": builder})
    lay = _layers(ndim)

    def filters(level: int) -> int:
        return max(1, min(cfg["max_filters"], int(round(cfg["base_filters"] * cfg["filter_multiplier"] ** level))))

    inputs = _input(cfg, ndim)
    x = inputs
    skips = []
    for level in range(cfg["depth"]):
        x = _conv_block(x, filters(level), cfg, ndim, f"enc_l{level}")
        skips.append(x)
        x = lay["pool"](2, name=f"enc_l{level}_pool")(x)
    x = _conv_block(x, filters(cfg["depth"]), cfg, ndim, "bottleneck")
    for level in reversed(range(cfg["depth"])):
        x = lay["up"](filters(level), 2, strides=2, kernel_initializer="he_normal", name=f"dec_l{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec_l{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters(level), cfg, ndim, f"dec_l{level}")
    return keras.Model(inputs, _head(x, cfg, ndim), name=builder)


def unet_2d(config: Mapping[str, Any]) -> keras.Model:
    """2D U-Net: input ``(N, y, x, in_channels)`` -> softmax ``(N, y, x, num_classes)`` float32.

    Config keys (defaults in ``DEFAULT_CONFIGS["unet_2d"]``): ``depth`` (poolings; inputs must be
    divisible by ``2**depth``), ``base_filters``, ``filter_multiplier`` (filters at level ``l`` =
    ``base_filters * filter_multiplier**l`` capped at ``max_filters``), ``convs_per_block``,
    ``kernel_size``, ``norm`` (``batch``/``instance``/``none``), ``activation``, ``dropout``
    (spatial dropout after every block), ``residual`` (residual conv blocks), ``attention``
    (``None``/``"cbam"``), ``cbam_reduction``, ``cbam_kernel_size``.
    """
    return _unet(config, 2, "unet_2d")


def unet_3d(config: Mapping[str, Any]) -> keras.Model:
    """3D U-Net: input ``(N, z, y, x, in_channels)`` -> softmax ``(N, z, y, x, num_classes)`` float32.

    Same keys as :func:`unet_2d`; every spatial axis is pooled by 2 at each level, so each of
    ``z, y, x`` must be divisible by ``2**depth``.
    """
    return _unet(config, 3, "unet_3d")


def vgg16_unet_2d(config: Mapping[str, Any]) -> keras.Model:
    """U-Net whose encoder is ``keras.applications.VGG16`` (``include_top=False``).

    Input ``(N, y, x, in_channels)`` -> softmax ``(N, y, x, num_classes)`` float32. VGG16 blocks
    ``1 .. depth + 1`` form the encoder (``depth`` <= 4 poolings; block ``depth + 1`` is the
    bottleneck), their layers copied as ``enc_block<b>_conv<i>`` so the model stays flat. Skips are
    the last convolution of blocks ``1 .. depth``.

    Config keys besides the common ones: ``encoder_weights`` (``None`` = random initialisation, or
    the path of a *local* VGG16 no-top weights file; nothing is ever downloaded), ``frozen_blocks``
    (VGG16 blocks ``1..frozen_blocks`` are not trainable), ``decoder_filters`` (``None`` = the
    encoder's widths, else ``depth`` integers, full resolution first), ``convs_per_block``,
    ``kernel_size``, ``residual`` for the decoder blocks. ``in_channels != 3`` inserts a trainable
    1x1 convolution ``enc_adapter`` mapping the channels to VGG16's three.

    Raises:
        MedSegAIInputError: ``encoder_weights`` is not an existing local file.
    """
    cfg = resolve_config({**config, "builder": "vgg16_unet_2d"})
    weights = cfg["encoder_weights"]
    if weights is not None and not os.path.isfile(weights):
        raise MedSegAIInputError(
            f"VGG16 encoder weights file {weights!r} does not exist; give the path of a local "
            "VGG16 no-top weights file or set encoder_weights to null."
        )
    try:
        vgg = keras.applications.VGG16(include_top=False, weights=weights, input_shape=(None, None, 3))
    except (ValueError, OSError) as e:
        raise MedSegAIInputError(
            f"could not load VGG16 encoder weights from {weights!r} ({e}); give a VGG16 no-top weights file."
        ) from e

    inputs = _input(cfg, 2)
    x = inputs
    if cfg["in_channels"] != 3:
        x = keras.layers.Conv2D(3, 1, name="enc_adapter")(x)
    n_blocks = cfg["depth"] + 1
    skips = []
    widths = []
    for block, n_convs, width in _VGG16_BLOCKS[:n_blocks]:
        for i in range(1, n_convs + 1):
            src = vgg.get_layer(f"block{block}_conv{i}")
            layer_cfg = src.get_config()
            layer_cfg["name"] = f"enc_block{block}_conv{i}"
            layer_cfg["trainable"] = block > cfg["frozen_blocks"]
            layer = keras.layers.Conv2D.from_config(layer_cfg)
            x = layer(x)
            layer.set_weights(src.get_weights())
            layer.trainable = block > cfg["frozen_blocks"]
        if block < n_blocks:
            skips.append(x)
            widths.append(width)
            x = keras.layers.MaxPooling2D(2, name=f"enc_block{block}_pool")(x)
    x = _attention(x, cfg, "bottleneck")
    x = _dropout(x, cfg, 2, "bottleneck")
    dec_filters = cfg["decoder_filters"] or widths
    for level in reversed(range(cfg["depth"])):
        f = dec_filters[level]
        x = keras.layers.Conv2DTranspose(f, 2, strides=2, kernel_initializer="he_normal", name=f"dec_l{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec_l{level}_concat")([x, skips[level]])
        x = _conv_block(x, f, cfg, 2, f"dec_l{level}")
    return keras.Model(inputs, _head(x, cfg, 2), name="vgg16_unet_2d")


def _dense_block(x: Any, cfg: Mapping[str, Any], prefix: str) -> Any:
    """``layers_per_block`` pre-activation layers (norm -> act -> 3x3 conv), each concatenated."""
    for i in range(1, cfg["layers_per_block"] + 1):
        y = _norm(x, cfg, f"{prefix}_d{i}_norm")
        y = _act(y, cfg, f"{prefix}_d{i}_act")
        y = keras.layers.Conv2D(
            cfg["growth_rate"], 3, padding="same", kernel_initializer="he_normal", name=f"{prefix}_d{i}_conv"
        )(y)
        y = _dropout(y, cfg, 2, f"{prefix}_d{i}")
        x = keras.layers.Concatenate(name=f"{prefix}_d{i}_cat")([x, y])
    return _attention(x, cfg, prefix)


def _transition(x: Any, cfg: Mapping[str, Any], prefix: str) -> Any:
    channels = max(1, int(math.floor(x.shape[-1] * cfg["compression"])))
    x = _norm(x, cfg, f"{prefix}_trans_norm")
    x = _act(x, cfg, f"{prefix}_trans_act")
    return keras.layers.Conv2D(channels, 1, kernel_initializer="he_normal", name=f"{prefix}_trans_conv")(x)


def dense_unet_2d(config: Mapping[str, Any]) -> keras.Model:
    """Dense U-Net: dense blocks in encoder and decoder (FC-DenseNet style, pre-activation).

    Input ``(N, y, x, in_channels)`` -> softmax ``(N, y, x, num_classes)`` float32. A 3x3 stem
    convolution (``base_filters``) feeds ``depth`` encoder levels, each a dense block of
    ``layers_per_block`` layers adding ``growth_rate`` channels, a 1x1 transition compressing the
    channels by ``compression`` and a 2x2 max pooling; then a dense bottleneck block and ``depth``
    decoder levels (transposed convolution, concatenation with the skip, dense block, transition).
    """
    cfg = resolve_config({**config, "builder": "dense_unet_2d"})
    inputs = _input(cfg, 2)
    x = keras.layers.Conv2D(
        cfg["base_filters"], 3, padding="same", kernel_initializer="he_normal", name="enc_stem_conv"
    )(inputs)
    skips = []
    for level in range(cfg["depth"]):
        x = _dense_block(x, cfg, f"enc_l{level}")
        skips.append(x)
        x = _transition(x, cfg, f"enc_l{level}")
        x = keras.layers.MaxPooling2D(2, name=f"enc_l{level}_pool")(x)
    x = _dense_block(x, cfg, "bottleneck")
    x = _transition(x, cfg, "bottleneck")
    for level in reversed(range(cfg["depth"])):
        up_filters = max(1, int(skips[level].shape[-1]) // 2)
        x = keras.layers.Conv2DTranspose(
            up_filters, 2, strides=2, kernel_initializer="he_normal", name=f"dec_l{level}_up"
        )(x)
        x = keras.layers.Concatenate(name=f"dec_l{level}_concat")([x, skips[level]])
        x = _dense_block(x, cfg, f"dec_l{level}")
        x = _transition(x, cfg, f"dec_l{level}")
    x = _norm(x, cfg, "dec_out_norm")
    x = _act(x, cfg, "dec_out_act")
    return keras.Model(inputs, _head(x, cfg, 2), name="dense_unet_2d")


# The builder names are config.BUILDERS (what a recipe may name); each is this module's function of that name.
_NETWORKS: dict[str, Callable[[Mapping[str, Any]], keras.Model]] = {name: globals()[name] for name in BUILDERS}


def build_model(config: Mapping[str, Any]) -> keras.Model:
    """Build the network named by ``config["builder"]`` (see ``BUILDERS``/``DEFAULT_CONFIGS``).

    Args:
        config: builder configuration; missing keys take ``DEFAULT_CONFIGS[builder]`` values.
            Store :func:`resolve_config` of it in ``model.json`` (``architecture.config``).

    Returns:
        An uncompiled ``keras.Model`` named after the builder, channels-last, float32 softmax output.

    Raises:
        TypeError/ValueError: invalid config (the message names the key).
        MedSegAIInputError: VGG16 ``encoder_weights`` missing or not a local file.
    """
    cfg = resolve_config(config)
    return _NETWORKS[cfg["builder"]](cfg)


# ----------------------------------------------------------------------------------------------
# fine-tuning helpers
# ----------------------------------------------------------------------------------------------
def freeze_encoder(model: keras.Model, trainable: bool = False) -> list[str]:
    """Set ``trainable`` on every encoder layer (name starting with ``enc_``).

    Args:
        model: a model built by this module.
        trainable: ``False`` freezes the encoder (default); ``True`` unfreezes it again.

    Returns:
        Names of the layers changed.

    Raises:
        TypeError: ``model`` is not a ``keras.Model``.
        ValueError: the model has no ``enc_`` layers (not built by this module).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    names = []
    for layer in model.layers:
        if layer.name.startswith("enc_"):
            layer.trainable = trainable
            names.append(layer.name)
    if not names:
        raise ValueError(f"model {model.name!r} has no encoder layers named 'enc_*'; it was not built by MedSegAI")
    return names


def label_values(labels: Sequence[Any], what: str) -> dict[str, int]:
    """``{name: value}`` from label names (value = position + 1) or ``model.json`` label dicts."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"{what} must be a sequence of label names or label dicts, got {type(labels).__name__}")
    values: dict[str, int] = {}
    for i, label in enumerate(labels):
        if isinstance(label, str):
            name, value = label, i + 1
        elif isinstance(label, Mapping) and "name" in label:
            name, value = label["name"], int(label.get("value", i + 1))
        else:
            raise TypeError(f"{what}[{i}] must be a label name or a dict with 'name' (and 'value'), got {label!r}")
        if name in values:
            raise ValueError(f"{what} names label {name!r} twice")
        values[name] = value
    return values


def adapt_from_parent(
    new_model: keras.Model,
    parent_model: keras.Model,
    parent_labels: Sequence[str | Mapping[str, Any]],
    new_labels: Sequence[str | Mapping[str, Any]],
) -> dict[str, list[str]]:
    """Initialise ``new_model`` from ``parent_model`` for fine-tuning (``train --init``).

    Every layer of ``new_model`` whose name exists in ``parent_model`` with identical weight
    shapes gets the parent's weights. The head (``head_conv``) is adapted per label: output
    channel 0 (background) and the channel of every label present in both label lists (matched by
    *name*) are copied from the parent's channel of that label; labels new to ``new_model`` keep
    their fresh initialisation. ``parent_model`` is only read, never modified.

    Args:
        new_model: freshly built model (its head has ``max(new values) + 1`` output channels).
        parent_model: the trained model to start from.
        parent_labels: the parent's foreground labels, as names (value = position + 1) or
            ``model.json`` label dicts (``name``, ``value``).
        new_labels: the new model's labels, same forms.

    Returns:
        ``{"copied_layers": [...], "skipped_layers": [...], "head_copied_labels": [...],
        "head_new_labels": [...]}`` (layer and label names).

    Raises:
        TypeError: wrong argument types.
        ValueError: a label value does not fit the head's channels.
    """
    for name, model in (("new_model", new_model), ("parent_model", parent_model)):
        if not isinstance(model, keras.Model):
            raise TypeError(f"{name} must be a keras.Model, got {type(model).__name__}")
    parent_values = label_values(parent_labels, "parent_labels")
    new_values = label_values(new_labels, "new_labels")
    parent_layers = {layer.name: layer for layer in parent_model.layers}

    report: dict[str, list[str]] = {
        "copied_layers": [],
        "skipped_layers": [],
        "head_copied_labels": [],
        "head_new_labels": [],
    }
    for layer in new_model.layers:
        if not layer.weights:
            continue
        src = parent_layers.get(layer.name)
        if layer.name == "head_conv":
            if src is None:
                report["skipped_layers"].append(layer.name)
                continue
            _adapt_head(layer, src, parent_values, new_values, report)
            continue
        if src is None:
            report["skipped_layers"].append(layer.name)
            continue
        src_weights = src.get_weights()
        dst_shapes = [tuple(w.shape) for w in layer.weights]
        if [tuple(w.shape) for w in src_weights] != dst_shapes:
            report["skipped_layers"].append(layer.name)
            continue
        layer.set_weights(src_weights)
        report["copied_layers"].append(layer.name)
    return report


def _adapt_head(
    layer: keras.layers.Layer,
    src: keras.layers.Layer,
    parent_values: Mapping[str, int],
    new_values: Mapping[str, int],
    report: dict[str, list[str]],
) -> None:
    dst = [w.copy() for w in layer.get_weights()]
    par = src.get_weights()
    if len(dst) != len(par) or dst[0].shape[:-1] != par[0].shape[:-1]:
        report["skipped_layers"].append(layer.name)
        report["head_new_labels"].extend(new_values)
        return
    k_new, k_par = dst[0].shape[-1], par[0].shape[-1]
    for what, values, k in (("parent_labels", parent_values, k_par), ("new_labels", new_values, k_new)):
        bad = {n: v for n, v in values.items() if not 1 <= v < k}
        if bad:
            raise ValueError(f"{what} values {bad} do not fit a head with {k} output channels")
    pairs = [(0, 0)]
    for name, value in new_values.items():
        if name in parent_values:
            pairs.append((value, parent_values[name]))
            report["head_copied_labels"].append(name)
        else:
            report["head_new_labels"].append(name)
    for d, p in pairs:
        for w_dst, w_par in zip(dst, par):
            w_dst[..., d] = w_par[..., p]
    layer.set_weights(dst)
