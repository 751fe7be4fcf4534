"""The measured sub-voxel split: a known within-voxel spread is measured back, a lone deposit far
from the axis is not smeared, and the model and `pcshower fit-split` use the table."""

import math

import pytest
import torch

from pcshower.data import Showers
from pcshower.io import write_parquet
from pcshower.models.checkpoint import load_model, model_payload, save_checkpoint
from pcshower.models.cli import fit_split
from pcshower.models.model import ShowerModel
from pcshower.models.split import (SPREAD_R_EDGES, SPREAD_Z_EDGES, declump_points,
                                   measure_voxel_spread, split_points, spread_boxes)
from pcshower.simulate.reduce import reduce_points

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (0.25, 0.25, 1.0)
SMALL = {"slices": {"num": 5, "z_max_x0": 10.0}, "flow": {"transforms": 1, "hidden": [8]},
         "epic": {"point_dim": 8, "global_dim": 4, "hidden": 8, "layers": 1},
         "split": {"factor": 8, "box": list(GRID), "spread": True}}


def fine_showers(n=3, seed=0):
    """Every voxel of GRID within 1 R_M of the axis (voxel-centre depths 1-10 X0) holds two deposits of equal
    energy at x +- 0.05 R_M, z +- 0.2 X0 about its centre: transverse variance (0.05^2 + 0) / 2
    (x and y pooled), depth variance 0.2^2. At 3 R_M single deposits (no spread)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(-4, 5, dtype=torch.float32)
    cx, cy = torch.meshgrid(i * 0.25, i * 0.25, indexing="ij")
    near = torch.hypot(cx, cy).flatten() <= 1.0
    cx, cy = cx.flatten()[near], cy.flatten()[near]
    rows, counts = [], []
    for _ in range(n):
        pts = []
        for z in torch.arange(1.0, 11.0):
            for sx, sz in ((-0.05, -0.2), (0.05, 0.2)):
                pts.append(torch.stack([cx + sx, cy, torch.full_like(cx, z + sz),
                                        torch.full_like(cx, 1e-3)], 1))
        a = (torch.arange(50) + torch.rand(1, generator=g)) * 2 * math.pi / 50
        r = torch.full((50,), 3.0)  # 0.38 R_M apart: one deposit per voxel
        pts.append(torch.stack([r * a.cos(), r * a.sin(), 1 + 8 * torch.rand(50, generator=g),
                                torch.full((50,), 1e-4)], 1))
        p = torch.cat(pts)
        rows.append(p)
        counts.append(len(p))
    return Showers.from_counts(torch.cat(rows), torch.tensor(counts), torch.full((n,), 50.0),
                               theta=torch.full((n,), 1.2), frame="physics")


def test_a_known_within_voxel_spread_is_measured_back():
    table, info = measure_voxel_spread(fine_showers(), GRID, progress=False)
    assert table.shape == (len(SPREAD_R_EDGES) - 1, len(SPREAD_Z_EDGES) - 1, 2)
    assert info["showers"] == 3
    r_bin = {r: max(k for k, e in enumerate(SPREAD_R_EDGES) if e <= r) for r in (0.0, 0.6, 3.0)}
    z_bin = 2  # 4-6 X0
    for r in (0.0, 0.6):  # full voxels: sqrt(12 var)
        assert table[r_bin[r], z_bin, 0] == pytest.approx(math.sqrt(12 * 0.05 ** 2 / 2), rel=1e-3)
        assert table[r_bin[r], z_bin, 1] == pytest.approx(math.sqrt(12 * 0.2 ** 2), rel=1e-3)
    assert table[r_bin[3.0], z_bin].abs().max() < 1e-6  # lone deposits: no spread
    assert bool(torch.isfinite(table).all())  # empty bins were filled from their neighbours


def test_split_over_the_measured_boxes_leaves_lone_tail_deposits_in_place():
    fine = fine_showers(2)
    table, _ = measure_voxel_spread(fine, GRID, progress=False)
    merged = reduce_points(fine, GRID)
    boxes = spread_boxes(merged.points, table)
    out, ptr = split_points(merged.points, merged.ptr, 8, boxes, torch.Generator().manual_seed(0))
    parent = merged.points.repeat_interleave(8, 0)
    far = torch.hypot(parent[:, 0], parent[:, 1]) > 2.0
    assert bool(far.any()) and torch.allclose(out[far, :3], parent[far, :3], atol=1e-5)
    near = ~far
    assert float((out[near, 0] - parent[near, 0]).abs().max()) > 0.03  # the core is spread
    assert float((out[near, 0] - parent[near, 0]).abs().max()) <= 0.5 * 0.1225 + 1e-5
    e_in = torch.zeros(2, dtype=torch.float64).index_add_(0, merged.batch, merged.points[:, 3].double())
    e_out = torch.zeros(2, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(2), ptr.diff()), out[:, 3].double())
    assert torch.allclose(e_in, e_out, rtol=1e-6)


def test_per_point_boxes_are_checked():
    p = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        split_points(p, torch.tensor([0, 3]), 2, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        split_points(p, torch.tensor([0, 3]), 2, -torch.ones(3, 3))
    with pytest.raises(ValueError, match="physics frame"):
        measure_voxel_spread(fine_showers(1)._replace(frame="detector"), GRID, progress=False)
    with pytest.raises(ValueError, match="grid"):
        measure_voxel_spread(fine_showers(1), (0.25, 0.0, 1.0), progress=False)


def test_model_uses_the_measured_table_and_warns_until_it_is_measured():
    model = ShowerModel(SMALL)
    assert model.split_spread[..., 0].unique().tolist() == [0.25]  # uniform voxel until measured
    with pytest.warns(UserWarning, match="fit-split"):
        model.sample(torch.tensor([50.0]), torch.tensor([1.2]), torch.tensor([0.0]), steps=1,
                     generator=torch.Generator().manual_seed(0))
    info = model.fit_split_spread(fine_showers(), progress=False)
    assert int(model.split_spread_showers) == 3 == info["showers"]
    assert model.split_spread[0, 2, 0] == pytest.approx(0.1225, rel=1e-3)
    with pytest.raises(ValueError, match="split.spread needs"):
        ShowerModel({**SMALL, "split": {"factor": 8, "box": None, "spread": True}})
    with pytest.raises(ValueError, match="split.spread: false"):
        ShowerModel({k: v for k, v in SMALL.items() if k != "split"}).fit_split_spread(fine_showers())


def test_fit_split_writes_a_checkpoint_with_the_table_and_the_same_weights(tmp_path):
    torch.manual_seed(0)
    old = ShowerModel({**SMALL, "split": {"factor": 4, "box": list(GRID)}})
    save_checkpoint(tmp_path / "m.pt", model_payload(old, provenance={"data_path": "x"}))
    write_parquet(tmp_path / "fine.parquet", fine_showers(5))
    info = fit_split(str(tmp_path / "m.pt"), str(tmp_path / "fine.parquet"), str(tmp_path / "s.pt"),
                     factor=16, max_showers=4, progress=False)
    assert info["showers"] == 4
    new = load_model(tmp_path / "s.pt")
    assert new.config["split"] == {"factor": 16, "box": list(GRID), "spread": True,
                                   "snap_depth": False, "declump": False, "spread_key": "centroid"}
    assert int(new.split_spread_showers) == 4
    assert new.checkpoint_info["provenance"]["data_path"] == "x"
    assert new.checkpoint_info["provenance"]["split_spread"]["showers"] == 4
    for k, v in old.state_dict().items():
        assert torch.equal(v, new.state_dict()[k]), k
    save_checkpoint(tmp_path / "nobox.pt", model_payload(ShowerModel(
        {k: v for k, v in SMALL.items() if k != "split"})))
    with pytest.raises(ValueError, match="split.box"):
        fit_split(str(tmp_path / "nobox.pt"), str(tmp_path / "fine.parquet"), str(tmp_path / "x.pt"),
                  progress=False)


def test_snap_depth_puts_points_at_the_measured_depth_of_the_training_points(tmp_path):
    """With slices centred on the grid's depth planes, fit-split --snap-depth measures the
    energy-weighted mean depth of the grid's voxel centroids (the training points) per slice, and
    generation puts every point of a slice there before the split."""
    centred = {**SMALL, "slices": {"num": 10, "z_max_x0": 10.0, "centred": True}}
    fine = fine_showers(4)
    merged = reduce_points(fine, GRID)
    model = ShowerModel({**centred, "split": {**SMALL["split"], "snap_depth": True}})
    z, e = merged.points[:, 2].double(), merged.points[:, 3].double()
    k = model.codec.slice_of(merged.points[:, 2])
    expect = (torch.zeros(10, dtype=torch.float64).index_add_(0, k, e * z)
              / torch.zeros(10, dtype=torch.float64).index_add_(0, k, e).clamp_min(1e-30))
    filled = torch.bincount(k, minlength=10) > 0
    model.fit_split_spread(fine, progress=False)
    assert torch.allclose(model.slice_depth.double()[filled], expect[filled], atol=1e-5)
    assert float(model.slice_depth[0]) == 0.25  # no training point in [0, 0.5): its middle
    # generation: every calibrated point of a slice at that depth (zero boxes: no split spread)
    model.split_spread.zero_()
    pts = merged.points.clone()
    pts[:, 2] += 0.3 * (torch.rand(len(pts), generator=torch.Generator().manual_seed(1)) - 0.5)
    shape = model.codec.measure(pts, merged.batch, len(merged))
    out, _ = model.postprocess(pts, merged.ptr, shape, torch.Generator().manual_seed(0))
    assert set(out[:, 2].unique().tolist()) <= set(model.slice_depth.tolist())
    # the command line sets it and stores the depths
    save_checkpoint(tmp_path / "m.pt", model_payload(ShowerModel(centred)))
    write_parquet(tmp_path / "fine.parquet", fine)
    fit_split(str(tmp_path / "m.pt"), str(tmp_path / "fine.parquet"), str(tmp_path / "s.pt"),
              snap_depth=True, progress=False)
    snapped = load_model(tmp_path / "s.pt")
    assert snapped.config["split"]["snap_depth"] is True
    assert torch.allclose(snapped.slice_depth.double()[filled], expect[filled], atol=1e-5)
    assert len(snapped.checkpoint_info["provenance"]["split_spread"]["slice_depth"]) == 10
    with pytest.raises(ValueError, match="snap_depth needs"):  # slices not on the grid's planes
        ShowerModel({**SMALL, "split": {**SMALL["split"], "snap_depth": True}})


def _voxel_counts(points, ptr):
    batch = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr[1:] - ptr[:-1])
    ijk = torch.floor(points[:, :3].double() / torch.tensor(GRID, dtype=torch.float64) + 0.5)
    return torch.unique(torch.cat([batch[:, None].double(), ijk], 1), dim=0, return_counts=True)[1]


def test_declump_moves_clashing_points_along_the_arc_to_free_voxels():
    """Shower 0: three points in one voxel at r = 1 R_M, a full 3 x 3 core (one extra point in
    the central voxel, no free voxel on its arc), a lone tail point. Shower 1: a point in the same
    voxel as shower 0's clump (another shower: no clash)."""
    clump = torch.tensor([[1.0, 0.0, 3.0, 0.5], [1.02, 0.01, 3.1, 0.3], [0.98, -0.02, 2.9, 0.2]])
    i = torch.tensor([-1.0, 0.0, 1.0]) * 0.25
    cx, cy = torch.meshgrid(i, i, indexing="ij")
    core = torch.stack([cx.flatten(), cy.flatten(), torch.full((9,), 3.0), torch.ones(9)], 1)
    core = torch.cat([core, torch.tensor([[0.02, 0.01, 3.0, 2.0]])])
    tail = torch.tensor([[0.0, 2.0, 5.0, 0.1]])
    points = torch.cat([clump, core, tail, torch.tensor([[1.0, 0.01, 3.0, 0.4]])])
    ptr = torch.tensor([0, 14, 15])
    out, moved = declump_points(points, ptr, GRID)
    assert moved == 2
    assert torch.equal(out[:, 2:], points[:, 2:])  # depth and energy kept
    r_in, r_out = torch.hypot(points[:, 0], points[:, 1]), torch.hypot(out[:, 0], out[:, 1])
    assert torch.allclose(r_out, r_in, atol=1e-6)  # radius kept: the radial profile is unchanged
    assert torch.equal(out[[0, *range(3, 15)]], points[[0, *range(3, 15)]])  # the rest untouched
    # the clump now lies in three voxels; only the central core voxel still holds two points
    assert sorted(_voxel_counts(out, ptr).tolist()) == [1] * 13 + [2]
    assert sorted(_voxel_counts(points, ptr).tolist()) == [1] * 10 + [2, 3]
    # one step of 0.25 R_M of arc each, to opposite sides
    angle = torch.atan2(out[1:3, 1], out[1:3, 0]) - torch.atan2(points[1:3, 1], points[1:3, 0])
    assert torch.allclose(angle.abs() * r_in[1:3], torch.tensor([0.25, 0.25]), atol=1e-5)
    assert float(angle[0] * angle[1]) < 0
    assert declump_points(out, ptr, GRID)[1] == 0  # nothing left that can move
    # a far outlier (voxel ids beyond int64 arithmetic: the generic ranking) changes nothing else
    far = torch.cat([points, torch.tensor([[3e9, 0.0, 1.0, 1e-3]])])
    out_far, moved_far = declump_points(far, torch.tensor([0, 14, 16]), GRID)
    assert moved_far == 2 and torch.equal(out_far[:15], out) and torch.equal(out_far[15], far[15])
    with pytest.raises(ValueError, match="grid"):
        declump_points(points, ptr, (0.25, 0.0, 1.0))


def test_model_declump_runs_after_calibration_and_keeps_the_profiles():
    model = ShowerModel({**SMALL, "split": {"factor": 1, "box": list(GRID), "declump": True}})
    shower = fine_showers(2)
    pts = shower.points.clone()
    pts[:, :2] = pts[:, :2].round(decimals=1)  # clumps: points pile up on a 0.1 R_M lattice
    shape = model.codec.measure(pts, shower.batch, len(shower))
    plain = ShowerModel({**SMALL, "split": {"factor": 1, "box": list(GRID)}})
    ref, _ = plain.postprocess(pts, shower.ptr, shape)
    out, _ = model.postprocess(pts, shower.ptr, shape)
    assert _voxel_counts(out, shower.ptr).numel() > _voxel_counts(ref, shower.ptr).numel()
    assert torch.equal(out[:, 2:], ref[:, 2:])
    assert torch.allclose(torch.hypot(out[:, 0], out[:, 1]), torch.hypot(ref[:, 0], ref[:, 1]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="slice_core_radius needs core_radius"):
        ShowerModel({**SMALL, "slice_core_radius": 0.3})
    with pytest.raises(ValueError, match="declump needs"):
        ShowerModel({**SMALL, "split": {"factor": 1, "box": None, "declump": True}})


def test_spread_table_can_be_keyed_by_the_voxel_centre():
    """A central voxel whose two deposits (x = 0.02 and 0.10 R_M) put its centroid at 0.06 R_M:
    keyed by centroid its spread lands in the 0.05-0.1 R_M bin, keyed by voxel centre in the
    axis bin, and points are looked up alike (a point at 0.1 R_M lies in the central voxel)."""
    pts = torch.tensor([[0.02, 0.0, 3.0, 1e-3], [0.10, 0.0, 3.0, 1e-3]])
    fine = Showers.from_counts(pts, torch.tensor([2]), torch.tensor([50.0]),
                               theta=torch.tensor([1.2]), frame="physics")
    box = math.sqrt(12 * 0.04 ** 2 / 2)  # variance 0.04^2 in x, 0 in y, pooled
    by_centroid, _ = measure_voxel_spread(fine, GRID, progress=False)
    by_voxel, _ = measure_voxel_spread(fine, GRID, by_voxel=True, progress=False)
    assert float(by_centroid[1, 1, 0]) == pytest.approx(box, rel=1e-4)
    assert float(by_voxel[0, 1, 0]) == pytest.approx(box, rel=1e-4)
    probe = torch.tensor([[0.1, 0.0, 3.0, 1e-3]])
    table = torch.zeros_like(by_voxel)
    table[0, :, 0], table[2, :, 0] = 0.2, 0.05
    assert float(spread_boxes(probe, table)[0, 0]) == pytest.approx(0.05)
    assert float(spread_boxes(probe, table, grid=GRID)[0, 0]) == pytest.approx(0.2)
    model = ShowerModel({**SMALL, "split": {**SMALL["split"], "spread_key": "voxel"}})
    model.fit_split_spread(fine, progress=False)
    assert torch.allclose(model.split_spread, by_voxel)
    with pytest.raises(ValueError, match="spread_key"):
        ShowerModel({**SMALL, "split": {**SMALL["split"], "spread_key": "radius"}})


def test_fit_split_command_sets_the_generation_time_calibration(tmp_path):
    from pcshower.cli import main

    centred = {**SMALL, "slices": {"num": 10, "z_max_x0": 10.0, "centred": True}}
    save_checkpoint(tmp_path / "m.pt", model_payload(ShowerModel(centred)))
    write_parquet(tmp_path / "fine.parquet", fine_showers(3))
    assert main(["fit-split", str(tmp_path / "m.pt"), "--data", str(tmp_path / "fine.parquet"),
                 "--out", str(tmp_path / "s.pt"), "--factor", "16", "--snap-depth", "--declump",
                 "--spread-key", "voxel", "--core-radius", "0.5", "--slice-core-radius", "0.3",
                 "--no-progress"]) == 0
    cfg = load_model(tmp_path / "s.pt").config
    assert cfg["split"] == {"factor": 16, "box": list(GRID), "spread": True, "snap_depth": True,
                            "declump": True, "spread_key": "voxel"}
    assert (cfg["core_radius"], cfg["slice_core_radius"]) == (0.5, 0.3)
    with pytest.raises(ValueError, match="--slice-core-radius must be a positive radius"):
        fit_split(str(tmp_path / "m.pt"), str(tmp_path / "fine.parquet"), str(tmp_path / "x.pt"),
                  slice_core_radius=-1.0, progress=False)
