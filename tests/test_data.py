"""Data sets: shapes, standardisation, the fixed probe set, and user-owned data errors."""

import pytest

from lsdb.errors import SpecError
from lsdb.spec import DataSpec
from lsdb.train.data import load_data, probe_indices


def test_digits_split_and_standardisation():
    d = load_data(DataSpec(name="digits"))
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert d.num_classes == 10


def test_mnist1d_default_arguments():
    d = load_data(DataSpec(name="mnist1d"))
    assert tuple(d.x_train.shape) == (4000, 40) and tuple(d.x_test.shape) == (1000, 40)
    assert abs(float(d.x_train.mean())) < 1e-5


def test_probe_set_is_fixed_and_bounded():
    d = load_data(DataSpec(name="digits"))
    a, b = probe_indices(d, 64, 0), probe_indices(d, 64, 0)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 64
    with pytest.raises(SpecError, match="larger than the training set"):
        probe_indices(d, 100_000, 0)


def test_missing_user_data_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="CIFAR-10 not found .* never downloads"):
        load_data(DataSpec(name="cifar10", root=str(tmp_path)))
