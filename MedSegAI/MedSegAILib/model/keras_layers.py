"""MedSegAI's own Keras layers, the ones a shipped model's ``model.keras`` may hold.

Imported only when a Keras model is built or loaded (it imports Keras): by
:func:`MedSegAILib.model.keras_model.register_custom_objects` before a ``.keras`` file loads, and by the
training package's network builders. Each layer is registered under the Keras package name
``medsegai`` (``"medsegai>CBAM"``), the name existing ``.keras`` files carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = ["CBAM"]


@keras.saving.register_keras_serializable(package="medsegai")
class CBAM(keras.layers.Layer):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018) for 2D or 3D feature maps.

    Channel attention (shared MLP over spatial average- and max-pooled features) followed by
    spatial attention (a ``kernel_size`` convolution over the channel-wise mean and max). Works on
    channels-last tensors ``(N, y, x, C)`` or ``(N, z, y, x, C)``; output has the input's shape.

    Args:
        reduction_ratio: channel reduction of the MLP's hidden layer (``max(1, C // ratio)`` units).
        spatial_kernel_size: size of the spatial-attention convolution (odd, >= 1).
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, reduction_ratio: int = 8, spatial_kernel_size: int = 7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(reduction_ratio, int) or isinstance(reduction_ratio, bool) or reduction_ratio < 1:
            raise ValueError(f"CBAM reduction_ratio must be an integer >= 1, got {reduction_ratio!r}")
        if (
            not isinstance(spatial_kernel_size, int)
            or isinstance(spatial_kernel_size, bool)
            or spatial_kernel_size < 1
            or spatial_kernel_size % 2 == 0
        ):
            raise ValueError(f"CBAM spatial_kernel_size must be an odd integer >= 1, got {spatial_kernel_size!r}")
        self.reduction_ratio = reduction_ratio
        self.spatial_kernel_size = spatial_kernel_size

    def build(self, input_shape: Sequence[int | None]) -> None:
        rank = len(input_shape)
        if rank not in (4, 5):
            raise ValueError(f"CBAM expects a 4D or 5D channels-last input, got shape {tuple(input_shape)}")
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("CBAM needs a known channel dimension (last axis)")
        hidden = max(1, int(channels) // self.reduction_ratio)
        conv = keras.layers.Conv2D if rank == 4 else keras.layers.Conv3D
        self.mlp_hidden = keras.layers.Dense(hidden, activation="relu", name="mlp_hidden", dtype=self.dtype_policy)
        self.mlp_out = keras.layers.Dense(int(channels), name="mlp_out", dtype=self.dtype_policy)
        self.spatial_conv = conv(
            1,
            self.spatial_kernel_size,
            padding="same",
            activation="sigmoid",
            name="spatial_conv",
            dtype=self.dtype_policy,
        )
        self.mlp_hidden.build((None, int(channels)))
        self.mlp_out.build((None, hidden))
        self.spatial_conv.build(tuple(input_shape[:-1]) + (2,))
        self._rank = rank
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        rank = len(inputs.shape)
        spatial_axes = tuple(range(1, rank - 1))
        # Pool in float32: a float16 sum over a 512x512 window can overflow.
        x32 = ops.cast(inputs, "float32")
        avg = ops.cast(ops.mean(x32, axis=spatial_axes), self.compute_dtype)
        mx = ops.cast(ops.max(x32, axis=spatial_axes), self.compute_dtype)
        channel_att = ops.sigmoid(self.mlp_out(self.mlp_hidden(avg)) + self.mlp_out(self.mlp_hidden(mx)))
        for _ in spatial_axes:
            channel_att = ops.expand_dims(channel_att, axis=1)
        x = inputs * channel_att
        spatial_in = ops.concatenate(
            [ops.mean(x, axis=-1, keepdims=True), ops.max(x, axis=-1, keepdims=True)], axis=-1
        )
        return x * self.spatial_conv(spatial_in)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"reduction_ratio": self.reduction_ratio, "spatial_kernel_size": self.spatial_kernel_size})
        return config
