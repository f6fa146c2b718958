"""Index normalization against an independent reference rule (docs/levels.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unifeat import InvalidIndicesError
from unifeat._indices import check_index_spec, normalize_indices


def reference_rule(spec, num_levels, default=None):
    """docs/levels.md written the plain way: returns the indices, or None where it must fail."""
    if spec is None:
        spec = default
        if spec is None:
            return tuple(range(num_levels))
    if isinstance(spec, int):
        if spec < 1 or spec > num_levels:
            return None
        return tuple(range(num_levels - spec, num_levels))
    if len(spec) == 0:
        return None
    out = []
    for i in spec:
        if i < -num_levels or i >= num_levels:
            return None
        j = i + num_levels if i < 0 else i
        if j in out:
            return None
        out.append(j)
    return tuple(sorted(out))


@given(
    num_levels=st.integers(1, 40),
    spec=st.one_of(
        st.none(),
        st.integers(-3, 45),
        st.lists(st.integers(-45, 45), min_size=0, max_size=8),
        st.tuples(st.integers(-45, 45), st.integers(-45, 45)),
    ),
    default=st.one_of(st.none(), st.integers(1, 3)),
)
def test_normalize_matches_reference(num_levels, spec, default):
    expected = reference_rule(
        spec if not isinstance(spec, list) else tuple(spec),
        num_levels,
        default if default is None or default <= num_levels else None,
    )
    effective_default = default if default is None or default <= num_levels else None
    if expected is None:
        with pytest.raises(InvalidIndicesError):
            normalize_indices(spec, num_levels, effective_default)
    else:
        got = normalize_indices(spec, num_levels, effective_default)
        assert got == expected
        assert all(0 <= i < num_levels for i in got)
        assert list(got) == sorted(set(got))


@given(st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True))
def test_order_of_request_does_not_matter(indices):
    assert normalize_indices(tuple(reversed(indices)), 10) == normalize_indices(indices, 10)


def test_out_of_range_names_the_valid_range():
    with pytest.raises(InvalidIndicesError, match=r"value 5 is out of range.*0\.\.4 or -5\.\.-1"):
        normalize_indices((1, 5), 5, context="'resnet50' (backend 'timm')")
    with pytest.raises(InvalidIndicesError, match=r"value -6 is out of range"):
        normalize_indices((-6,), 5)
    with pytest.raises(InvalidIndicesError, match=r"last 6 levels.*has 5: use 1\.\.5"):
        normalize_indices(6, 5)


def test_duplicates_name_the_offending_values():
    with pytest.raises(InvalidIndicesError, match=r"duplicate: 1 and -4 both name level 1"):
        normalize_indices((1, -4), 5)
    with pytest.raises(InvalidIndicesError, match=r"duplicate: 2 is repeated"):
        normalize_indices([2, 2], 5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((), r"out_indices is empty"),
        ([], r"out_indices is empty"),
        ((1, 2.0), r"must be integers, got 2\.0"),
        (("1",), r"must be integers, got '1'"),
        ((True,), r"must be integers, got True"),
        ("12", r"got '12' \(str\)"),
        (1.5, r"got 1\.5 \(float\)"),
        (True, r"got True \(bool\)"),
        (0, r"out_indices=0 .*at least 1"),
        (-2, r"out_indices=-2 .*at least 1"),
        ({1: 2}, r"got \{1: 2\} \(dict\)"),
    ],
)
def test_bad_forms_are_rejected_with_the_value(value, message):
    with pytest.raises(InvalidIndicesError, match=message):
        check_index_spec(value)


def test_integer_likes_are_accepted():
    assert check_index_spec(np.int64(2)) == 2
    assert check_index_spec(np.array([1, 3])) == (1, 3)
    assert check_index_spec(range(2, 4)) == (2, 3)


ZERO_D_INTS = [np.array(2), np.array(2, dtype=np.uint8), torch.tensor(2), torch.tensor(2).int()]


@pytest.mark.parametrize("value", ZERO_D_INTS, ids=repr)
def test_zero_d_integer_arrays_and_tensors_mean_that_int(value):
    assert check_index_spec(value) == check_index_spec(np.int64(2)) == 2
    assert normalize_indices(value, 5) == (3, 4)
    # As entries of a sequence too.
    assert check_index_spec((value, np.array(-1), torch.tensor(0))) == (2, -1, 0)


@pytest.mark.parametrize(
    "value",
    [np.array(2.0), np.array(True), torch.tensor(2.0), torch.tensor(True), np.bool_(True)],
    ids=repr,
)
def test_zero_d_float_and_bool_arrays_are_refused_naming_the_value(value):
    with pytest.raises(InvalidIndicesError, match=re.escape(repr(value))):
        check_index_spec(value)
    with pytest.raises(InvalidIndicesError, match=re.escape(repr(value))):
        check_index_spec((1, value))


def test_arrays_of_more_than_one_dimension_are_not_single_indices():
    with pytest.raises(InvalidIndicesError, match=re.escape(repr(torch.tensor([2])))):
        check_index_spec((torch.tensor([2]),))
    assert check_index_spec(torch.tensor([1, 3])) == (1, 3)
