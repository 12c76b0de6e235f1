"""Tests for reprotune.tokenize.packing: properties, equality with naive references, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprotune.testing import pack_first_fit
from reprotune.tokenize.packing import lower_bound_bins, pack_best_fit_decreasing, packing_efficiency

# ----------------------------------------------------------------------------- naive references


def naive_bfd(lengths, capacity):
    """O(n * bins) best-fit decreasing, item by item: the spec the fast packer must match."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        best = -1
        for b, r in enumerate(room):
            if r >= lengths[i] and (best < 0 or r < room[best]):  # strict <: ties go to older bin
                best = b
        if best < 0:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            room[best] -= lengths[i]
    return bins


def naive_ff(lengths, capacity, order):
    bins, room = [], []
    for i in order:
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def as_lists(bins):
    for b in bins:
        assert isinstance(b, np.ndarray) and b.dtype == np.int64 and b.ndim == 1
    return [b.tolist() for b in bins]


# ----------------------------------------------------------------------------- strategies


@st.composite
def lengths_and_capacity(draw):
    capacity = draw(st.integers(1, 64))
    # few distinct values -> long runs of equal lengths, the case the bulk path handles
    pool = draw(st.lists(st.integers(1, capacity), min_size=1, max_size=6))
    lengths = draw(st.lists(st.sampled_from(pool) | st.integers(1, capacity), max_size=120))
    return lengths, capacity


def check_valid(bins, lengths, capacity):
    seen = np.concatenate(bins) if bins else np.zeros(0, np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every index exactly once
    arr = np.asarray(lengths, dtype=np.int64)
    for b in bins:
        assert len(b) > 0
        assert arr[b].sum() <= capacity


# ----------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(lengths_and_capacity())
def test_bfd_matches_naive_and_is_valid(lc):
    lengths, capacity = lc
    bins = pack_best_fit_decreasing(lengths, capacity)
    check_valid(bins, lengths, capacity)
    assert as_lists(bins) == naive_bfd(lengths, capacity)


@settings(max_examples=200, deadline=None)
@given(lengths_and_capacity(), st.randoms(use_true_random=False))
def test_first_fit_matches_naive_and_is_valid(lc, rnd):
    lengths, capacity = lc
    order = list(range(len(lengths)))
    rnd.shuffle(order)
    bins = pack_first_fit(lengths, capacity, order=order)
    check_valid(bins, lengths, capacity)
    assert as_lists(bins) == naive_ff(lengths, capacity, order)
    assert as_lists(pack_first_fit(lengths, capacity)) == naive_ff(lengths, capacity, range(len(lengths)))


@settings(max_examples=100, deadline=None)
@given(lengths_and_capacity())
def test_bfd_deterministic_and_input_type_agnostic(lc):
    lengths, capacity = lc
    a = as_lists(pack_best_fit_decreasing(lengths, capacity))
    b = as_lists(pack_best_fit_decreasing(np.asarray(lengths, dtype=np.int32), capacity))
    c = as_lists(pack_best_fit_decreasing(tuple(lengths), np.int64(capacity)))
    assert a == b == c


def test_bfd_matches_naive_on_long_tailed_sample():
    # realistic shape (many bins, many rooms in play) at a size the naive packer can still do
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(60) - 0.5, 1.0, 3000), 2, 512).astype(np.int64)
    bins = pack_best_fit_decreasing(lengths, 512)
    assert as_lists(bins) == naive_bfd(lengths.tolist(), 512)
    assert packing_efficiency(int(np.sum(lengths)), len(bins), 512) > 0.99


def test_large_capacity_uses_generic_sort():
    lengths = [70_000, 5, 69_995, 100_000, 5]
    assert as_lists(pack_best_fit_decreasing(lengths, 100_000)) == naive_bfd(lengths, 100_000)


# ----------------------------------------------------------------------------- edge cases


def test_empty():
    assert pack_best_fit_decreasing([], 16) == []
    assert pack_best_fit_decreasing(np.zeros(0, dtype=np.int64), 16) == []
    assert pack_first_fit([], 16) == []


def test_item_equal_to_capacity_gets_own_bin():
    assert as_lists(pack_best_fit_decreasing([3, 8, 5], 8)) == [[1], [2, 0]]
    assert as_lists(pack_first_fit([3, 8, 5], 8)) == [[0, 2], [1]]


@pytest.mark.parametrize("packer", [pack_best_fit_decreasing, pack_first_fit])
@pytest.mark.parametrize("bad", [9, 0, -3])
def test_bad_length_names_index(packer, bad):
    with pytest.raises(ValueError, match=rf"lengths\[2\] = {bad}\b"):
        packer([1, 2, bad, 4], 8)


@pytest.mark.parametrize(
    "lengths, capacity",
    [
        ([1.5, 2.0], 8),  # floats
        ([[1, 2]], 8),  # not 1-D
        ([1, 2], 0),  # capacity < 1
        ([1, 2], True),  # bool capacity
    ],
)
def test_bad_inputs(lengths, capacity):
    with pytest.raises(ValueError):
        pack_best_fit_decreasing(lengths, capacity)


def test_first_fit_rejects_non_permutation():
    with pytest.raises(ValueError):
        pack_first_fit([1, 2, 3], 8, order=[0, 0, 1])
    with pytest.raises(ValueError):
        pack_first_fit([1, 2, 3], 8, order=[0, 1])


def test_metrics():
    assert lower_bound_bins(0, 8) == 0
    assert lower_bound_bins(8, 8) == 1
    assert lower_bound_bins(9, 8) == 2
    bins = pack_best_fit_decreasing([4, 4, 4], 8)
    assert packing_efficiency(12, len(bins), 8) == 12 / 16
    assert packing_efficiency(0, 0, 8) == 0.0
