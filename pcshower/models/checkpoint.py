"""One-file model checkpoints that load without unpickling code, with integrity and version checks.

A checkpoint is a ``torch.save`` of a plain dict (tensors, dicts, lists, strings, numbers) that
``torch.load(weights_only=True)`` reads without executing anything. It carries the model config,
the (EMA) weights, the feature normalisation, the frame, the pcshower version, the metrics
measured at training time and a SHA-256 digest over all of it: a file edited after writing is
rejected with a clear error instead of producing silently wrong showers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pcshower.io._atomic import atomic_path

__all__ = ["save_checkpoint", "read_checkpoint", "load_model", "checkpoint_state",
           "combine_checkpoints", "describe_model", "CheckpointError", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "pcshower-checkpoint"
#: Bumped whenever the layout of the dict or the meaning of a weight changes.
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, tampered, incompatible)."""


def _digest(obj, h=None) -> str:
    """SHA-256 of a nested structure of tensors and JSON-able values, independent of dict order."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(json.dumps(str(key)).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True).encode())
    return h.hexdigest()


def combined_training_record(points: dict, flow: dict) -> dict:
    """What a combined model was trained on, from its two parts' provenance: the particles both
    parts saw, and the azimuth range of the point network (the part conditioned on phi). Keys a
    part does not record are left out (generate then treats them as unknown)."""
    record = {}
    if "particles" in points and "particles" in flow:
        record["particles"] = sorted(set(points["particles"]) & set(flow["particles"]))
    if "phi_range_rad" in points:
        record["phi_range_rad"] = points["phi_range_rad"]
    return record


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (must hold ``config``, ``weights``, ``normalization``, ``frame``) with the
    format tag, versions and digest added; atomic (temporary file + rename)."""
    from pcshower import __version__

    body = {k: v for k, v in payload.items() if k != "sha256"}
    body.update(format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_VERSION,
                pcshower_version=__version__, torch_version=torch.__version__.split("+")[0])
    body["sha256"] = _digest(body)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(body, tmp)
    return path


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The verified checkpoint dict; raises :class:`CheckpointError` naming the file and problem."""
    path = Path(path)
    if path.is_dir():
        hint = " (a training run? its model is RUN/model.pt)" if (path / "model.pt").is_file() else ""
        raise ValueError(f"checkpoint {path} is a directory{hint}; name a .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        body = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); it is corrupt, truncated, or not a "
            f"pcshower checkpoint (pcshower never unpickles code)") from None
    if not isinstance(body, dict) or body.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pcshower checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    version = body.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version} (written by pcshower "
            f"{body.get('pcshower_version', '?')}); this pcshower reads version "
            f"{CHECKPOINT_VERSION}: use the matching pcshower version or retrain the model")
    stored = body.get("sha256")
    actual = _digest({k: v for k, v in body.items() if k != "sha256"})
    if stored != actual:
        raise CheckpointError(f"checkpoint {path} failed its integrity check (SHA-256 of the "
                              f"contents does not match the stored digest): the file was modified "
                              f"after it was written; re-download or retrain it")
    for key in ("config", "weights", "normalization", "frame"):
        if key not in body:
            raise CheckpointError(f"checkpoint {path} lacks the '{key}' entry")
    return body


def checkpoint_state(body: dict) -> dict:
    """The model ``state_dict`` a checkpoint dict holds (weights plus ``norm.*`` statistics):
    the inverse of :func:`model_payload`'s split."""
    return {**body["weights"], **{f"norm.{k}": v for k, v in body["normalization"].items()}}


def load_model(path: str | os.PathLike, device=None, *, objective: str | None = None):
    """A :class:`~pcshower.models.model.ShowerModel` in eval mode from a checkpoint file;
    its ``checkpoint_info`` holds the file's metadata (versions, metrics, data provenance).
    ``objective``: refuse a model trained with another objective (``"edm"``,
    ``"flow_matching"``, ``"consistency"``)."""
    from pcshower.models.model import ShowerModel

    body = read_checkpoint(path)
    recorded = body.get("objective", body["config"].get("objective", "edm"))
    if recorded != body["config"].get("objective", "edm"):
        raise CheckpointError(f"checkpoint {path} records objective {recorded!r} but its model "
                              f"config says {body['config'].get('objective')!r}")
    if objective is not None and recorded != objective:
        raise CheckpointError(f"checkpoint {path} is a {recorded!r} model; a {objective!r} model "
                              f"is needed here")
    try:
        model = ShowerModel(body["config"])
        model.load_state_dict(checkpoint_state(body))
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this pcshower's model "
                              f"({str(err).splitlines()[0]})") from None
    if body["frame"] != "physics":
        raise CheckpointError(f"checkpoint {path} is for the {body['frame']!r} frame; this pcshower "
                              f"generates from physics-frame models only")
    model.checkpoint_info = {k: v for k, v in body.items()
                             if k not in ("weights", "normalization", "training_state")}
    model.checkpoint_info["path"] = str(path)
    return model.to(device).eval() if device is not None else model.eval()


def model_payload(model, *, metrics: dict | None = None, provenance: dict | None = None) -> dict:
    """The checkpoint dict of a model (its current weights)."""
    state = model.state_dict()
    return {
        "config": model.config,
        "objective": model.objective.name,
        "frame": "physics",
        "weights": {k: v for k, v in state.items() if not k.startswith("norm.")},
        "normalization": {k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")},
        "metrics": metrics or {},
        "provenance": provenance or {},
    }


#: Normalisation buffers that belong to the flow (its standardised shape features).
FLOW_NORM_KEYS = frozenset({"norm.shape_mean", "norm.shape_std"})


def is_flow_state(key: str) -> bool:
    """Whether a model ``state_dict`` key belongs to the flow: its weights or the statistics of
    the shape features it samples (the rest is the point network's and shared conditioning)."""
    return key.startswith("flow.") or key in FLOW_NORM_KEYS


#: Model config keys of the point network alone (its backbone, objective and sampler): a
#: combined model takes them from its point-network part.
POINT_NETWORK_KEYS = ("backbone", "epic", "transformer", "objective", "edm", "flow_matching",
                      "consistency", "sampler", "steps")

#: Buffers measured at generation time by ``fit-split`` (not trained).
TABLE_KEYS = frozenset({"split_spread", "split_spread_showers", "slice_depth"})


def combine_checkpoints(points: str | os.PathLike, flow: str | os.PathLike,
                        out: str | os.PathLike, *, tables: str = "points") -> Path:
    """One checkpoint from two runs trained apart (e.g. in parallel, ``train.parts: [points]``
    and ``[flow]``, or a new point network beside an existing model's flow): the flow and its
    shape-feature statistics of ``flow``, the point network and point and condition statistics
    of ``points``, and the generation-time tables (``fit-split``) of the part ``tables`` names.

    The config is ``flow``'s with the point network's own keys (:data:`POINT_NETWORK_KEYS`:
    backbone, objective, sampler, ...) of ``points``; the rest may differ only in the flow's
    own size (``flow``) and the encoding of its fractions (``fraction_eps``,
    ``fraction_dequantize``; not for a shape-conditioned point network) — the shape features
    (slices, rings) and every generation-time setting must agree, else the flow would sample
    features the calibration reads differently. Atomic write; the provenance names both files
    and their digests."""
    if tables not in ("points", "flow"):
        raise ValueError(f"tables must be 'points' or 'flow', got {tables!r}")
    pb, fb = read_checkpoint(points), read_checkpoint(flow)
    from pcshower.models.model import DEFAULT_MODEL_CONFIG, ShowerModel, merge_config

    pc, fc = (merge_config(DEFAULT_MODEL_CONFIG, b["config"]) for b in (pb, fb))
    # the flow's size and how its fraction features are encoded concern the flow alone, unless
    # the point network reads the shape features too (epic.shape_embed)
    own = {"flow", *POINT_NETWORK_KEYS} | (
        set() if pc["epic"]["shape_embed"] else {"fraction_eps", "fraction_dequantize"})
    differ = sorted(k for k in fc if k not in own and fc[k] != pc[k])
    if differ:
        raise CheckpointError(f"cannot combine {points} and {flow}: their model configs differ in "
                              f"{differ} (only {sorted(own)} may differ); train both parts "
                              f"with the same model section")
    if pb["frame"] != fb["frame"]:
        raise CheckpointError(f"cannot combine a {pb['frame']!r}-frame and a {fb['frame']!r}-frame "
                              f"checkpoint")
    config = {**fc, **{k: pc[k] for k in POINT_NETWORK_KEYS}}
    model = ShowerModel(config)
    ps, fs = checkpoint_state(pb), checkpoint_state(fb)
    table_source = ps if tables == "points" else fs
    state = {k: (table_source if k in TABLE_KEYS else fs if is_flow_state(k) else ps)[k]
             for k in model.state_dict()}
    model.load_state_dict(state)
    provenance = {"combined": {part: {"path": str(path), "sha256": b["sha256"],
                                      "provenance": b.get("provenance", {})}
                               for part, path, b in (("points", points, pb), ("flow", flow, fb))}}
    provenance["combined"]["tables_from"] = tables
    provenance.update(combined_training_record(pb.get("provenance", {}), fb.get("provenance", {})))
    table_prov = (pb if tables == "points" else fb).get("provenance", {})
    if "split_spread" in table_prov:
        provenance["split_spread"] = table_prov["split_spread"]
    metrics = {"points": pb.get("metrics", {}), "flow": fb.get("metrics", {})}
    return save_checkpoint(out, model_payload(model, metrics=metrics, provenance=provenance))


#: Data-provenance keys a model card names (from the training data's Parquet metadata).
_DATA_KEYS = ("generator", "engine", "geant4_version", "geant4_physics", "geant4_tables",
              "stack", "geometry_stack", "seed", "energy_gev", "theta_deg", "particle", "warning")


def _training_parts(provenance: dict) -> dict:
    """``{part: provenance}`` of the runs a checkpoint came from (one, or two when combined),
    following a distilled model's start and a combination down to the data each part saw."""
    if "combined" in provenance:
        out = {}
        for part, entry in provenance["combined"].items():
            if isinstance(entry, dict) and "provenance" in entry:
                out[part] = entry["provenance"]
        return out
    return {"model": provenance}


def training_data(provenance: dict) -> list[dict]:
    """The data provenance (Parquet metadata ``provenance``) of every run a model was trained
    in, e.g. to see which engine and tables made its training showers."""
    return [dict(((p.get("data_metadata") or {}).get("provenance") or {}))
            for p in _training_parts(provenance or {}).values()]


def describe_model(path: str | os.PathLike) -> dict:
    """What ``pcshower info MODEL`` prints: the model's objective, backbone and sampler, its
    network calls per shower, the conditions it was trained on and, per training run, the data
    (engine, Geant4 version, physics list, tables, stack, number of showers)."""
    import math

    model = load_model(path)
    body = model.checkpoint_info
    cfg = model.config
    lo_e, hi_e = model.energy_range
    lo_t, hi_t = model.theta_range
    prov = body.get("provenance", {}) or {}
    summary = {
        "file": str(path), "format": f"pcshower checkpoint {body.get('format_version')}",
        "sha256": body.get("sha256"), "pcshower_version": body.get("pcshower_version"),
        "objective": model.objective.name, "backbone": cfg["backbone"],
        "sampler": cfg["sampler"], "steps": cfg["steps"],
        "network_calls_per_shower": model.network_calls(),
        "parameters": {"flow": sum(p.numel() for p in model.flow.parameters()),
                       "point_network": sum(p.numel() for p in model.points_net.parameters())},
        "energy_gev": [round(lo_e, 3), round(hi_e, 3)],
        "theta_deg": [round(math.degrees(lo_t), 2), round(math.degrees(hi_t), 2)],
        "particles": prov.get("particles", "not recorded"),
        "split_factor": cfg["split"]["factor"],
    }
    if "teacher" in prov:
        summary["distilled_from"] = prov["teacher"]
    for part, p in _training_parts(prov).items():
        meta = (p.get("data_metadata") or {})
        data = dict(meta.get("provenance") or {})
        entry = {"data": p.get("data_path", "in-memory showers"),
                 "showers": meta.get("num_showers")}
        entry.update({k: data[k] for k in _DATA_KEYS if k in data})
        if "teacher" in p:
            entry["distilled_from"] = p["teacher"].get("path")
        summary[f"trained_on ({part})" if part != "model" else "trained_on"] = entry
    metrics = body.get("metrics", {}) or {}
    for part, m in (metrics.items() if "points" in metrics or "flow" in metrics
                    else [("model", metrics)]):
        if isinstance(m, dict) and "steps" in m:
            summary[f"training ({part})" if part != "model" else "training"] = {
                "steps": m["steps"], "seconds": m.get("train_time_s"), "device": m.get("device")}
    return summary
