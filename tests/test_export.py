"""Exported pipelines (``pcshower export``): files that run in a process without pcshower and
give the showers of ``pcshower.generate`` for the same seed, points and cells."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import pcshower
from pcshower.geometry import load_geometry
from pcshower.models.export import DDML_MAX_ELEMENTS, export_model, read_export_metadata

# the model's own 16 steps: with fewer its showers grow far outliers that pcshower.generate
# hands over to the neighbouring barrel stave (another branch, see docs/integration.md)
STEPS = None

# Run in a fresh interpreter that cannot import pcshower: reads the file's metadata, seeds
# torch's global generator and writes the outputs to an .npz file.
_RUNNER = r"""
import json, sys
sys.modules["pcshower"] = None  # any import of pcshower fails from here on
import numpy as np, torch
path, out, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
extra = {"pcshower.json": ""}
m = torch.jit.load(path, map_location="cpu", _extra_files=extra)
meta = json.loads(extra["pcshower.json"])
res = {}
for i, (seed, e, th, ph) in enumerate(calls):
    torch.manual_seed(seed)
    if meta["layout"] == "ddml-caloclouds":
        t = lambda v: torch.tensor([[v]], dtype=torch.float32)
        res[f"out{i}"] = m(t(e), t(th), t(ph)).numpy()
    else:
        t = lambda v: torch.tensor(v, dtype=torch.float64)
        p, c = m(t(e), t(th), t(ph))
        res[f"points{i}"], res[f"counts{i}"] = p.numpy(), c.numpy()
np.savez(out, meta=json.dumps(meta), **res)
"""


def _run_fresh(path, tmp_path, calls):
    out = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", _RUNNER, str(path), str(out), json.dumps(calls)],
                   check=True, timeout=600)
    data = np.load(out)
    return json.loads(str(data["meta"])), data


@pytest.fixture(scope="module")
def ddml_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ild_ddml.pt"
    export_model(None, path, layout="ddml-caloclouds", geometry="ild", steps=STEPS)
    return path


@pytest.fixture(scope="module")
def native_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ild_native.pt"
    export_model(None, path, layout="native", geometry="ild", steps=STEPS, batch=2)
    return path


def _generated(energy, angle, seed, batch_size):
    return pcshower.generate(energy, angle, "ild", seed=seed, steps=STEPS, batch_size=batch_size)


def _with_points(showers, du, dv, layer, energy, counts):
    """``showers`` (detector frame) with other points (depth: the middle of each layer)."""
    geom = load_geometry("ild")
    span = torch.as_tensor(geom.layer_span_mm, dtype=torch.float64)
    depth = span.mean(1)[torch.as_tensor(layer, dtype=torch.int64)]
    pts = torch.stack([torch.as_tensor(du, dtype=torch.float64),
                       torch.as_tensor(dv, dtype=torch.float64), depth,
                       torch.as_tensor(energy, dtype=torch.float64)], 1).float()
    ptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), 0)
    return showers._replace(points=pts, ptr=ptr)


def _decode_ddml(out, layers=30):
    counts = out[:layers].astype(np.int64)
    body = out[layers:layers + 4 * counts.sum()].reshape(-1, 4)
    return counts, body


def test_metadata_records_model_geometry_units(ddml_file):
    meta = read_export_metadata(ddml_file)
    from pcshower.models.generate import load_default_model

    info = load_default_model().checkpoint_info
    assert meta["layout"] == "ddml-caloclouds" and meta["geometry"] == "ild"
    assert meta["model_sha256"] == info["sha256"] and meta["pcshower_version"] == pcshower.__version__
    assert meta["units"]["energy"] == "GeV" and meta["units"]["deposit"].startswith("MeV")
    assert meta["network_calls"] == 31 and meta["max_elements"] == DDML_MAX_ELEMENTS
    # the file has its own weights: exporting leaves the caller's model trainable
    assert all(p.requires_grad for p in load_default_model().parameters())


def test_ddml_file_gives_generate_showers_in_a_process_without_pcshower(ddml_file, tmp_path):
    # normal incidence at the middle of stave 0 (global 90 deg): DDML's local theta 0; a low
    # energy, so that the shower fits DDML's output unmerged; then one that needs merging
    calls = [[11, 12.0, 0.0, 0.0], [12, 60.0, 0.0, 0.0]]
    meta, data = _run_fresh(ddml_file, tmp_path, calls)
    assert meta["layers"] == 30
    for i, (seed, e, _, _) in enumerate(calls):
        out = data[f"out{i}"]
        assert out.shape == (DDML_MAX_ELEMENTS,) and out.dtype == np.float32
        counts, body = _decode_ddml(out)
        ref = _generated(e, 90.0, seed, 1)
        pts = ref.points.double().numpy()
        layer = load_geometry("ild")._layer_of_depth(ref.points[:, 2].double()).numpy()
        np.testing.assert_array_equal(np.bincount(body[:, 2].astype(int), minlength=30)[:30], counts)
        # per-layer visible energy identical (merging keeps energy exactly)
        np.testing.assert_allclose(np.bincount(body[:, 2].astype(int), body[:, 3], minlength=30),
                                   np.bincount(layer, pts[:, 3], minlength=30), rtol=1e-5, atol=1e-4)
        if i == 0:  # unmerged: the same points, ordered by layer (x = v, y = -u in DDML's frame)
            assert counts.sum() == len(pts)
            order = np.argsort(layer, kind="stable")
            np.testing.assert_allclose(body[:, 0], pts[order, 1], atol=1e-4)
            np.testing.assert_allclose(body[:, 1], -pts[order, 0], atol=1e-4)
            np.testing.assert_allclose(body[:, 3], pts[order, 3], rtol=1e-6, atol=1e-7)
            # and the same cells after pcshower's projection
            mine = load_geometry("ild").project(_with_points(ref, -body[:, 1], body[:, 0],
                                                             body[:, 2], body[:, 3], [len(body)]))
            assert torch.equal(mine.cell_id, ref.hits.cell_id)
            np.testing.assert_allclose(mine.energy.numpy(), ref.hits.energy.numpy(), rtol=1e-5)
        else:  # merged to fit DDML's output
            assert counts.sum() < len(pts) and 30 + 4 * counts.sum() <= DDML_MAX_ELEMENTS


def test_ddml_oblique_incidence_matches_generate(ddml_file, tmp_path):
    # global 60 deg on stave 0: 30 deg to the normal, towards +z (DDML's +x): local phi 0
    meta, data = _run_fresh(ddml_file, tmp_path, [[21, 15.0, 30.0, 0.0]])
    counts, body = _decode_ddml(data["out0"])
    ref = _generated(15.0, 60.0, 21, 1)
    layer = load_geometry("ild")._layer_of_depth(ref.points[:, 2].double()).numpy()
    pts = ref.points.double().numpy()
    assert abs(int(counts.sum()) - len(pts)) <= 2  # float32 angles: a point may cross a layer edge
    np.testing.assert_allclose(np.bincount(body[:, 2].astype(int), body[:, 3], minlength=30),
                               np.bincount(layer, pts[:, 3], minlength=30), rtol=2e-3, atol=0.05)
    assert abs(body[:, 0].mean() - pts[:, 1].mean()) < 0.05  # drifts along +v like generate's


def test_native_file_batches_like_generate(native_file, tmp_path):
    geom = load_geometry("ild")
    angle = np.array([90.0, 70.0])
    th, ph = geom.local_direction(torch.tensor(np.radians(angle)), torch.zeros(2))
    th, ph = np.degrees(th.numpy()).tolist(), np.degrees(ph.numpy()).tolist()
    e = [20.0, 35.0]
    meta, data = _run_fresh(native_file, tmp_path, [[5, e, th, ph]])
    assert meta["layout"] == "native" and meta["batch"] == 2
    points, counts = data["points0"], data["counts0"]
    ref = _generated(e, angle, 5, 2)
    np.testing.assert_array_equal(counts, ref.num_points.numpy())
    for b in range(2):
        mine = points[b, :counts[b]]
        theirs = ref[b].points.double().numpy()
        assert not points[b, counts[b]:].any()  # zero rows after the shower
        np.testing.assert_allclose(mine[:, [0, 1, 2]], theirs[:, :3], atol=1e-3)
        np.testing.assert_allclose(mine[:, 4], theirs[:, 3], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mine[:, 3], geom._layer_of_depth(
            torch.as_tensor(theirs[:, 2])).numpy())


def test_native_any_number_of_showers(native_file):
    m = torch.jit.load(str(native_file))
    torch.manual_seed(3)
    points, counts = m(torch.tensor([30.0, 40.0, 50.0]), torch.zeros(3), torch.zeros(3))
    assert points.shape[0] == 3 and counts.shape == (3,) and bool((counts > 100).all())
    e = torch.stack([points[b, :counts[b], 4].sum() for b in range(3)])
    assert bool((e[1:] > e[:1]).all())  # more energy for more energetic showers


def test_export_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown export layout"):
        export_model(None, tmp_path / "x.pt", layout="ddml-calodit-v9")
    with pytest.raises(ValueError, match="no barrel staves"):
        export_model(None, tmp_path / "x.pt", layout="ddml-caloclouds",
                     geometry="calochallenge_ds2")
    with pytest.warns(UserWarning, match="m_nLayer = 40"), pytest.raises(ValueError, match="exists"):
        (tmp_path / "cld.pt").write_bytes(b"")  # the warning comes before the (refused) work
        export_model(None, tmp_path / "cld.pt", layout="ddml-caloclouds", geometry="cld")
    with pytest.raises(ValueError, match="batch must be 1"):
        export_model(None, tmp_path / "x.pt", layout="ddml-caloclouds", batch=4)
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="exists"):
        export_model(None, tmp_path / "x.pt", layout="native")


def test_cli_export_writes_a_loadable_file(tmp_path, capsys):
    from pcshower.cli import main

    out = tmp_path / "ild.pt"
    assert main(["export", "default", "--layout", "ddml-caloclouds", "--steps", "1",
                 "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = read_export_metadata(out)
    assert meta["steps"] == 1 and meta["geometry"] == "ild"
    with pytest.raises(SystemExit):
        main(["export", "default", "--layout", "nonsense", "--out", str(out)])


def test_read_metadata_refuses_foreign_files(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="not one pcshower exported"):
        read_export_metadata(path)


def test_ddml_input_frame_matches_the_face_frame_chain(ddml_file):
    """DDML's local direction (theta 30, phi 90: towards DDML's +y = the stave's -u) is the face
    frame's azimuth 180 deg: the file's points are the chain's there, x = v and y = -u."""
    import copy

    from pcshower.models.export import _LocalChain
    from pcshower.models.generate import load_default_model

    net = copy.deepcopy(load_default_model())
    net.chunk_points = None
    chain = _LocalChain(net, load_geometry("ild"), 0, 16, "heun", 0.0, True)
    m = torch.jit.load(str(ddml_file))
    torch.manual_seed(4)
    out = m(torch.tensor([[12.0]]), torch.tensor([[30.0]]), torch.tensor([[90.0]])).numpy()
    torch.manual_seed(4)
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    pts, _ = chain(f64(12.0), f64(np.radians(30.0)), f64(np.pi))
    pts = pts.numpy()
    counts, body = _decode_ddml(out)
    assert counts.sum() == len(pts)  # a 12 GeV shower fits unmerged
    order = np.argsort(pts[:, 3], kind="stable")
    np.testing.assert_allclose(body[:, 0], pts[order, 1], atol=1e-3)
    np.testing.assert_allclose(body[:, 1], -pts[order, 0], atol=1e-3)
    assert body[:, 1].mean() > 5.0  # the shower drifts towards DDML's +y


def test_export_leaves_the_callers_state_and_files_check_their_inputs(ddml_file, tmp_path):
    import copy

    from pcshower.models.generate import load_default_model

    torch.manual_seed(99)
    want = torch.rand(3)
    torch.manual_seed(99)
    export_model(None, tmp_path / "s.pt", layout="native", steps=1)
    assert torch.equal(torch.rand(3), want)  # the caller's random stream is untouched
    m = torch.jit.load(str(ddml_file))
    one = lambda v: torch.tensor([[v]])  # noqa: E731
    for e, th, words in ((float("nan"), 0.0, "energy"), (-5.0, 0.0, "energy"),
                         (50.0, 95.0, "theta")):
        with pytest.raises(torch.jit.Error, match=words):  # a c10::Error in libtorch
            m(one(e), one(th), one(0.0))
    # a model conditioned on a spread of azimuths cannot be exported to a local frame
    net = copy.deepcopy(load_default_model())
    net.checkpoint_info = copy.deepcopy(net.checkpoint_info)
    net.checkpoint_info["provenance"]["phi_range_rad"] = [0.0, 6.28]
    with pytest.raises(ValueError, match="conditioned on the azimuth"):
        export_model(net, tmp_path / "phi.pt", layout="native")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        export_model(None, tmp_path / "z.pt", layout="native", steps=0)


def test_a_geant4_taught_model_exports_with_its_stacks_response(tmp_path):
    """A model whose training showers were recorded Geant4 deposits is read with the stack's
    measured Geant4 layer response, in the file as in pcshower.generate: the same showers for
    the same seed in a process without pcshower (the response's layer factors are drawn inside
    the graph), and the metadata names the reading."""
    import copy

    from pcshower.models.generate import load_default_model

    net = load_default_model()
    taught = copy.copy(net)
    taught.checkpoint_info = copy.deepcopy(net.checkpoint_info)
    taught.checkpoint_info["provenance"]["training_data"] = {"engine": "geant4",
                                                             "physics_energy": "per-cell deposit"}
    path = tmp_path / "taught.pt"
    meta = export_model(taught, path, layout="native", geometry="ild", batch=2)
    assert meta["layer_response"] == "Geant4 layer response shipped for ild"
    e = [20.0, 35.0]
    meta, data = _run_fresh(path, tmp_path, [[5, e, [0.0, 0.0], [0.0, 0.0]]])
    assert meta["layer_response"] == "Geant4 layer response shipped for ild"
    ref = pcshower.generate(e, 90.0, "ild", model=taught, seed=5, batch_size=2)
    assert ref.metadata["layer_response"] == meta["layer_response"]
    plain = pcshower.generate(e, 90.0, "ild", model=net, seed=5, batch_size=2)
    points, counts = data["points0"], data["counts0"]
    np.testing.assert_array_equal(counts, ref.num_points.numpy())
    assert not np.array_equal(counts, plain.num_points.numpy())  # another reading than sampling
    for b in range(2):
        theirs = ref[b].points.double().numpy()
        np.testing.assert_allclose(points[b, :counts[b], :3], theirs[:, :3], atol=1e-3)
        np.testing.assert_allclose(points[b, :counts[b], 4], theirs[:, 3], rtol=1e-5, atol=1e-6)
