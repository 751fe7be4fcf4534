"""The Showers container: construction, validation errors, indexing and conversions."""

import numpy as np
import pytest
import torch

from pcshower import Showers
from tests.conftest import make_showers


def assert_same(a: Showers, b: Showers):
    assert torch.equal(a.points, b.points)
    assert torch.equal(a.ptr, b.ptr)
    for name, value in a.conditions().items():
        assert torch.equal(value, getattr(b, name)), name


def test_from_list_and_from_counts_agree():
    clouds = [np.random.default_rng(i).random((i + 1, 4)).astype(np.float32) for i in range(5)]
    a = Showers.from_list(clouds, energy=np.arange(1, 6))
    b = Showers.from_counts(torch.from_numpy(np.concatenate(clouds)), [1, 2, 3, 4, 5],
                            energy=np.arange(1, 6))
    assert_same(a, b)
    assert a.num_points.tolist() == [1, 2, 3, 4, 5]
    assert a.ptr.tolist() == [0, 1, 3, 6, 10, 15]
    assert torch.equal(a.shower(3), torch.from_numpy(clouds[3]))
    assert a.batch.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4]


def test_particle_names_and_broadcast_conditions():
    s = Showers.from_list([np.ones((2, 4))] * 3, energy=50, theta=0.5, particle="e-")
    assert s.energy.tolist() == [50.0] * 3
    assert s.particle.tolist() == [11] * 3
    assert s.position.shape == (3, 3)
    with pytest.raises(ValueError, match="unknown particle"):
        Showers.from_list([np.ones((2, 4))], energy=1, particle="graviton")


@pytest.mark.parametrize("field,value,match", [
    ("nan", float("nan"), r"shower 1: NaN in point feature 'y'"),
    ("inf", float("inf"), r"shower 1: infinite value in point feature 'y'"),
    ("neg", -1.0, r"shower 1: negative energy -1 in point feature 'e'"),
])
def test_bad_point_values_name_shower_and_field(field, value, match):
    points = torch.ones(6, 4)
    col = 3 if field == "neg" else 1
    points[3, col] = value
    with pytest.raises(ValueError, match=match):
        Showers(points=points, ptr=[0, 2, 4, 6], energy=[1, 2, 3])


def test_ptr_errors():
    points = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"shower 1: ptr is not monotone"):
        Showers(points=points, ptr=[0, 3, 2, 4], energy=[1, 1, 1])
    with pytest.raises(ValueError, match=r"ptr ends at 3 but there are 4 points"):
        Showers(points=points, ptr=[0, 1, 3], energy=[1, 1])
    with pytest.raises(ValueError, match=r"ptr must start at 0"):
        Showers(points=points, ptr=[1, 4], energy=[1])


def test_condition_errors_name_field():
    points = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"condition 'energy' has shape \(3,\), expected \(2,\)"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2, 3])
    with pytest.raises(ValueError, match=r"condition 'theta' has shape"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2], theta=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"shower 1: condition 'energy' must be > 0"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, -2])
    with pytest.raises(ValueError, match=r"shower 0: condition 'phi' is not finite"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2], phi=[float("nan"), 0])
    with pytest.raises(ValueError, match=r"shower 1: condition 'theta' = 4 rad is outside"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2], theta=[0, 4])
    with pytest.raises(ValueError, match=r"condition 'position' has shape"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2], position=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"shower 1: condition 'position' is not finite"):
        Showers(points=points, ptr=[0, 1, 4], energy=[1, 2],
                position=[[0, 0, 0], [0, float("inf"), 0]])
    with pytest.raises(ValueError, match="frame must be one of"):
        Showers(points=points, ptr=[0, 4], energy=[1], frame="lab")


def test_indexing_slicing_masks(showers):
    n = len(showers)
    assert_same(showers[2:7], Showers.concat([showers[i] for i in range(2, 7)]))
    idx = [5, 0, 5, n - 1]
    picked = showers[idx]
    for k, i in enumerate(idx):
        assert torch.equal(picked.shower(k), showers.shower(i))
        assert picked.energy[k] == showers.energy[i]
    mask = showers.energy > 50
    assert len(showers[mask]) == int(mask.sum())
    assert_same(showers[-1], showers[n - 1])
    assert_same(showers[::2], showers[list(range(0, n, 2))])
    with pytest.raises(IndexError):
        showers[n]


def test_split_concat_roundtrip(showers):
    parts = showers.split(7)
    assert [len(p) for p in parts] == [7, 7, 6]
    assert_same(Showers.concat(parts), showers)
    parts = showers.split([5, 15])
    assert_same(Showers.concat(parts), showers)
    with pytest.raises(ValueError, match="add up to"):
        showers.split([5, 5])
    with pytest.raises(ValueError, match="features"):
        Showers.concat([showers, make_showers(extra_features=("t",))])


def test_dense_roundtrip(showers):
    dense, mask = showers.to_dense()
    assert dense.shape == (len(showers), int(showers.num_points.max()), 4)
    assert mask.sum(1).tolist() == showers.num_points.tolist()
    assert (dense[~mask] == 0).all()
    back = Showers.from_dense(dense, mask, showers.energy, theta=showers.theta, phi=showers.phi,
                              particle=showers.particle, position=showers.position)
    assert_same(back, showers)
    with pytest.raises(ValueError, match="more than max_points"):
        showers.to_dense(max_points=3)


def test_pyg_roundtrip(showers):
    batch = showers.to_pyg()
    assert batch.num_graphs == len(showers)
    assert torch.equal(batch.x, showers.points)
    assert_same(Showers.from_pyg(batch), showers)
    from torch_geometric.data import Batch, Data

    data = [Data(x=showers.shower(i), energy=showers.energy[i:i + 1]) for i in range(3)]
    rebuilt = Showers.from_pyg(Batch.from_data_list(data))
    assert torch.equal(rebuilt.points, showers[:3].points)
    assert torch.equal(rebuilt.energy, showers.energy[:3])


def test_to_device_and_numpy(showers):
    moved = showers.to("cpu", dtype=torch.float64)
    assert moved.points.dtype == torch.float64
    arrays = showers.to_numpy()
    assert set(arrays) == {"points", "ptr", "energy", "theta", "phi", "particle", "position"}
    assert arrays["points"].shape == (showers.total_points, 4)


def test_empty_batch():
    empty = Showers.empty()
    assert len(empty) == 0 and empty.total_points == 0
    assert empty.to_dense()[0].shape == (0, 0, 4)


def test_plain_import_reaches_subpackages_and_entry_points():
    import subprocess
    import sys

    code = ("import pcshower; assert callable(pcshower.simulate.simulate); "
            "assert callable(pcshower.io.read_parquet); assert callable(pcshower.load_geometry); "
            "assert callable(pcshower.generate)")
    subprocess.run([sys.executable, "-c", code], check=True)
