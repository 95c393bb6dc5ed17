"""jaxllm.packing: a pytree of host arrays in two buffers laid out as a PackedLayout, cut back
out inside jit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm.packing import layout_of, pack, unpack
from jaxllm.step_inputs import SamplingTensors


def test_pack_unpack_round_trips_every_dtype_and_shape_under_jit():
    rng = np.random.default_rng(0)
    tree = {"ids": rng.integers(-5, 5, (3, 4)).astype(np.int32),
            "seeds": np.array([0, 2**31, 2**32 - 1], np.uint32),     # high bit patterns survive
            "flags": np.array([True, False, True]), "empty": np.zeros((2, 0), np.float32),
            "x": rng.standard_normal(5).astype(np.float32), "scalar": np.float32(1.5)}
    layout = layout_of(tree)
    buffers = pack(tree, layout)
    assert [b.dtype for b in buffers] == [np.int32, np.float32]
    assert buffers[0].size == 12 + 3 + 3 and buffers[1].size == 5 + 1
    got = jax.jit(unpack, static_argnums=1)(buffers, layout)
    assert got.keys() == tree.keys()
    for name, value in tree.items():
        assert got[name].dtype == value.dtype and got[name].shape == np.shape(value), name
        np.testing.assert_array_equal(np.asarray(got[name]), value)


def test_pack_copies_and_the_layout_depends_on_shapes_only():
    rows = SamplingTensors.build(4, temperature=0.5, seeds=7)
    layout = layout_of(rows)
    buffers = pack(rows, layout)
    rows.temperature[:] = 9.0                      # the caller reuses its arrays at once
    assert float(unpack(buffers, layout).temperature[0]) == 0.5
    same, other = layout_of(SamplingTensors.build(4)), layout_of(SamplingTensors.build(8))
    assert same == layout and hash(same) == hash(layout)   # values never change the layout
    assert other != layout                                  # shapes do


def test_pack_rejects_a_dtype_it_cannot_carry_and_arrays_off_the_layout():
    with pytest.raises(TypeError, match="float64"):
        layout_of({"x": np.zeros(3, np.float64)})
    layout = layout_of({"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"float32\[3\]"):
        pack({"x": np.zeros(4, np.float32)}, layout)
    with pytest.raises(ValueError, match=r"int32\[3\] where the layout has float32\[3\]"):
        pack({"x": np.zeros(3, np.int32)}, layout)
