"""LoRA and DoRA layers over a frozen nn.Linear or nn.QuantizedLinear, in mlx-lm's parameter layout.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

BASE_TYPES = (nn.Linear, nn.QuantizedLinear)


def dense_weight(linear: nn.Module) -> mx.array:
    """A base layer's weight [out, in] as floats (dequantized when it is stored quantized)."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.biases,
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
    return linear.weight


def dims(linear: nn.Module) -> tuple[int, int]:
    """(input, output) widths of a linear or quantized linear layer."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = base(x) + scale · dropout(x) A B, A [in, r] and B [r, out] (peft's lora_A.weight.T and lora_B.weight.T,
    scale = alpha / r). The base layer is used as it is, quantized or not: no dense copy is kept."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = dims(linear)
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def update(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + self.update(x)

    def delta(self) -> mx.array:
        """The low-rank change of the weight, [out, in]."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fused_weight(self) -> mx.array:
        weight = dense_weight(self.linear)
        return weight + self.delta().astype(weight.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """One ordinary layer computing the same function (re-quantized like the base unless `dequantize`)."""
        weight = self.fused_weight()
        has_bias = "bias" in self.linear
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        fused.weight = weight
        if has_bias:
            fused.bias = self.linear.bias
        if isinstance(self.linear, nn.QuantizedLinear) and not dequantize:
            base = self.linear
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused


class DoRALinear(LoRALinear):
    """DoRA: the LoRA-adapted weight's rows renormalised to a learned magnitude m,
    y = m / ||W + scale·(AB)ᵀ||_row · (x Wᵀ + scale · dropout(x) A B) + bias, the norm held constant in the
    gradient (peft and the DoRA paper §4.3); m starts at that norm."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = self.row_norm()

    def row_norm(self) -> mx.array:
        return mx.linalg.norm(super().fused_weight().astype(mx.float32), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        base = self.linear(x)
        if "bias" in self.linear:
            base = base - self.linear.bias
        magnitude = (self.m / mx.stop_gradient(self.row_norm())).astype(x.dtype)
        out = magnitude * (base + self.update(x))
        return out + self.linear.bias if "bias" in self.linear else out

    def fused_weight(self) -> mx.array:
        weight = super().fused_weight()
        return ((self.m / self.row_norm())[:, None] * weight).astype(weight.dtype)
