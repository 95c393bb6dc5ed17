"""Rotary position embeddings on the host: inverse frequencies per RoPE type, cos/sin per step.

numpy only. Each step's cos/sin are computed here once from the positions (see
``StepInputs.rotary``), in float32 as transformers computes them, for every distinct table of the
model (Gemma 3 has two: local layers rotate with base 10k, global layers with 1M).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """One rotary table: base, scaling, and how many leading dims of each head it rotates.

    ``scaling`` holds transformers' ``rope_parameters`` minus ``rope_theta``, as sorted items
    (hashable), e.g. (("factor", 8.0), ("rope_type", "linear")); None for plain RoPE.
    """

    rotary_dim: int
    theta: float = 10000.0
    scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048  # yarn's fallback for a missing factor

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be positive and even, got {self.rotary_dim}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @classmethod
    def from_hf(cls, parameters: dict[str, Any], rotary_dim: int,
                max_position_embeddings: int) -> "RopeSpec":
        """From one transformers ``rope_parameters`` dict (v5) or v4 ``rope_scaling`` dict."""
        parameters = dict(parameters)
        theta = float(parameters.pop("rope_theta", 10000.0))
        parameters.pop("partial_rotary_factor", None)
        rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
        scaling = None
        if rope_type != "default":
            scaling = tuple(sorted({**parameters, "rope_type": rope_type}.items()))
        return cls(rotary_dim, theta, scaling, max_position_embeddings)

    @property
    def rope_type(self) -> str:
        return dict(self.scaling or ()).get("rope_type", "default")

    def inv_freq(self) -> tuple[np.ndarray, float]:
        """([rotary_dim / 2] float32 inverse frequencies, factor applied to cos and sin)."""
        dim = self.rotary_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        inv_freq = 1.0 / (self.theta ** exponents)
        s = dict(self.scaling or ())
        rope_type = self.rope_type
        if rope_type == "default":
            return inv_freq.astype(np.float32), 1.0
        if rope_type == "linear":
            return (inv_freq / s["factor"]).astype(np.float32), 1.0
        if rope_type == "llama3":
            return _llama3(inv_freq, s), 1.0
        return _yarn(self.theta, dim, s, self.max_position_embeddings)


def _llama3(inv_freq: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(base: float, dim: int, s: dict[str, Any], max_position_embeddings: int
          ) -> tuple[np.ndarray, float]:
    """YaRN (transformers' ``_compute_yarn_parameters``): a ramp between interpolated and
    extrapolated frequencies, and an attention factor on cos/sin."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


class RotaryTables:
    """The model's distinct rotary tables, filled per step on the host.

    Args:
        specs: one RopeSpec per table (``ModelConfig.rope``), all with the same rotary_dim.
    """

    def __init__(self, specs: Sequence[RopeSpec]) -> None:
        dims = {spec.rotary_dim for spec in specs}
        if len(dims) != 1:
            raise ValueError(f"rotary tables must share one rotary_dim, got {sorted(dims)}")
        tables = [spec.inv_freq() for spec in specs]
        self.inv_freq = np.stack([freq for freq, _ in tables])                 # [R, Hr/2]
        self.attention_factor = np.asarray([f for _, f in tables], np.float32)  # [R]
        self.shape = (len(specs), dims.pop())                                  # (R, Hr)

    def fill(self, positions: np.ndarray, out: np.ndarray) -> None:
        """out [R, T, Hr] float32 = cos | sin of positions [T] x each table's frequencies."""
        half = self.shape[1] // 2
        positions = positions.astype(np.float32)
        for r in range(self.shape[0]):
            angles = np.multiply.outer(positions, self.inv_freq[r])
            np.cos(angles, out=out[r, :, :half])
            np.sin(angles, out=out[r, :, half:])
            if self.attention_factor[r] != 1.0:
                out[r] *= self.attention_factor[r]
