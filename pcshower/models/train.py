"""Training of a :class:`~pcshower.models.model.ShowerModel` on physics-frame showers.

One loop trains ShowerFlow (maximum likelihood on the shape features of a large batch) and the
EPiC diffusion model (EDM loss on the points of a smaller batch) with one AdamW optimiser,
warm-up + cosine learning rate, gradient clipping, an exponential moving average of the weights
(the EMA weights are what ships), bf16 autocast on CUDA, a CSV log, and a training-state file
``last.pt`` every ``checkpoint_every`` steps. All randomness (batches, dequantisation, noise)
comes from one ``torch.Generator`` whose state is saved, so ``resume=True`` after a kill
continues bit-exactly where the last checkpoint left off.
"""

from __future__ import annotations

import copy
import csv
import itertools
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pcshower.data.showers import Showers
from pcshower.models.checkpoint import (FLOW_NORM_KEYS, CheckpointError, checkpoint_state,
                                        is_flow_state, model_payload, read_checkpoint,
                                        save_checkpoint)
from pcshower.models.distributed import Ranks, stream_training_data, training_path
from pcshower.models.model import DEFAULT_MODEL_CONFIG, ShowerModel, _check_physics, merge_config
from pcshower.units import resolve_device

__all__ = ["train", "finetune", "load_config", "bias_parameters", "DEFAULT_TRAIN_CONFIG",
           "FINETUNE_DEFAULTS", "TRAINABLE"]

log = logging.getLogger(__name__)

DEFAULT_TRAIN_CONFIG = {
    "steps": 2000,
    "batch_showers": 48,       # showers per diffusion step
    "flow_batch": 512,         # showers per flow step
    "lr": 5.0e-4,
    "weight_decay": 1.0e-5,
    "warmup": 100,
    "min_lr_fraction": 0.1,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "checkpoint_every": 250,
    "log_every": 10,
    "seed": 0,
    "val_fraction": 0.05,
    "amp": True,               # bf16 autocast, CUDA only
    "threads": None,           # torch.set_num_threads on CPU (None: leave as is)
    "parts": ["flow", "points"],  # which networks to train; the others stay as initialised
    "init_from": None,         # checkpoint to start from: its normalisation and every weight
                               # whose name and shape match (e.g. retrain only the flow)
    "teacher": None,           # the EDM checkpoint a consistency model is distilled from
                               # (objective: consistency, mode: distillation); the student
                               # starts from it unless init_from names another start
    "stream": False,           # read the points row group by row group instead of holding the
                               # set (always on under torchrun with several ranks)
    "stream_buffer": 4096,     # showers held for the streamed block shuffle, per rank
    "trainable": "all",        # "bias": of the trained parts only the biases and normalisation
                               # layers learn (parameter-efficient fine-tuning, pcshower finetune)
}

_LOG_FIELDS = ["step", "loss", "flow_loss", "point_loss", "lr", "grad_norm", "elapsed_s"]


def _whole(lo):
    return lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                      f"a whole number >= {lo}")


def _number(lo, hi=math.inf, *, lo_open=False, hi_open=False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return ok, f"a number in {left}{lo:g}, {hi:g}{right}"
    return check


#: What each ``train:`` key accepts: a check returning (ok, what was expected).
_TRAIN_CHECKS = {
    "steps": _whole(1), "batch_showers": _whole(1), "flow_batch": _whole(1),
    "lr": _number(0, lo_open=True), "weight_decay": _number(0), "warmup": _whole(0),
    "min_lr_fraction": _number(0, 1), "ema_decay": _number(0, 1, hi_open=True),
    "grad_clip": _number(0, lo_open=True), "checkpoint_every": _whole(1), "log_every": _whole(1),
    "seed": lambda v: (_whole(0)(v)[0] and v < 2 ** 64, "a whole number in [0, 2**64)"),
    "val_fraction": _number(0, 1, hi_open=True),
    "amp": lambda v: (isinstance(v, bool), "true or false"),
    "threads": lambda v: (v is None or _whole(1)(v)[0], "null or a whole number >= 1"),
    "parts": lambda v: (isinstance(v, list) and len(v) > 0 and set(v) <= {"flow", "points"}
                        and len(set(v)) == len(v), "a non-empty list of 'flow' and 'points'"),
    "init_from": lambda v: (v is None or isinstance(v, str), "null or a checkpoint path"),
    "teacher": lambda v: (v is None or isinstance(v, str), "null or a checkpoint path"),
    "stream": lambda v: (isinstance(v, bool), "true or false"),
    "stream_buffer": _whole(1),
    "trainable": lambda v: (v in TRAINABLE, f"one of {', '.join(TRAINABLE)}"),
}

#: ``train.trainable`` settings: every parameter of the trained parts, or only their biases and
#: normalisation layers (bias-only fine-tuning: arXiv 2512.00187 reports it works for transfer to
#: a new geometry, training 17 % of its model's parameters; 0.8 % of the shipped model's).
TRAINABLE = ("all", "bias")


def bias_parameters(module: torch.nn.Module) -> set[str]:
    """Names of ``module``'s biases and normalisation-layer parameters (what
    ``train.trainable: bias`` trains)."""
    names = {n for n, _ in module.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    for prefix, sub in module.named_modules():
        if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)):
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters()}
    return names


def load_config(path: str | os.PathLike | dict | None) -> dict:
    """``{"model": {...}, "train": {...}}`` from a YAML file (or a dict), validated once here:
    unknown keys and out-of-range values are rejected with the file, the key and what was
    expected. A file must have a ``train:`` section (an empty file is refused, not a default run);
    ``None`` (the API's default) means the default settings."""
    if path is None:
        raw = {"train": {}}
    elif isinstance(path, dict):
        raw = path
    else:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"training config {path} is a directory; name a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ValueError(f"training config {path} is not a text (YAML) file") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"training config {path}: not valid YAML{at}: {what}"
                             + (" (YAML does not allow tabs for indentation)"
                                if "\t" in path.read_text() else "")) from None
        if raw is None:
            raise ValueError(f"training config {path} is empty; it needs at least a 'train:' "
                             "section (see configs/tiny.yaml)")
    if not isinstance(raw, dict):
        raise ValueError(f"training config {path}: expected a mapping with 'model' and 'train'")
    unknown = set(raw) - {"model", "train", "data"}
    if unknown:
        raise ValueError(f"training config {path}: unknown top-level keys {sorted(unknown)}; "
                         f"use 'model', 'train' (and an informational 'data')")
    if "train" not in raw and not isinstance(path, dict):
        raise ValueError(f"training config {path} has no 'train:' section (steps, batch_showers, "
                         "...); see configs/tiny.yaml")
    if not isinstance(raw.get("train") or {}, dict):
        raise ValueError(f"training config {path}: 'train' must be a mapping of settings")
    train_cfg = dict(DEFAULT_TRAIN_CONFIG)
    for key, value in (raw.get("train") or {}).items():
        if key not in train_cfg:
            raise ValueError(f"training config {path}: unknown train key {key!r}; known: "
                             f"{sorted(train_cfg)}")
        ok, expected = _TRAIN_CHECKS[key](value)
        if not ok:
            raise ValueError(f"training config {path}: train.{key} must be {expected}, got {value!r}")
        train_cfg[key] = value
    try:
        ShowerModel(raw.get("model"))  # validates the model section
    except ValueError as err:
        if isinstance(path, dict):
            raise
        raise ValueError(f"training config {path}: {err}") from None
    return {"model": raw.get("model") or {}, "train": train_cfg, "data": raw.get("data") or {}}


def _lr_at(step: int, cfg: dict) -> float:
    warm = max(int(cfg["warmup"]), 1)
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    progress = min((step - warm) / max(cfg["steps"] - warm, 1), 1.0)
    floor = cfg["min_lr_fraction"]
    return cfg["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fingerprint(showers: Showers) -> list:
    return [len(showers), showers.total_points, float(showers.points[:, 3].double().sum()),
            float(showers.energy.sum())]


#: ``train:`` settings of ``pcshower finetune`` where the caller gives none: a short run at a tenth
#: of the default learning rate, so that a few hundred showers adjust the model rather than
#: overwrite it.
FINETUNE_DEFAULTS = {"steps": 500, "lr": 5.0e-5, "warmup": 20, "checkpoint_every": 100,
                     "val_fraction": 0.1}


def finetune(model: str | os.PathLike, data: Showers | str | os.PathLike,
             out: str | os.PathLike, *, trainable: str = "all", parts=None, settings=None,
             resume: bool = False, device=None, progress: bool = True) -> dict:
    """Adapt the checkpoint ``model`` to new physics-frame showers ``data`` (another detector's,
    say: a few hundred to ten thousand): a :func:`train` run with the model's own config that
    starts from every weight and the normalisation of ``model`` (``train.init_from``), writing
    ``out`` as ``train`` does (``--resume`` works alike).

    Args:
        trainable: ``"all"`` (full fine-tuning) or ``"bias"`` (only the biases and normalisation
            layers of the trained parts learn, :func:`bias_parameters`).
        parts: which networks learn (``["flow", "points"]`` by default).
        settings: other ``train:`` keys (steps, lr, batch_showers, ...) over
            :data:`FINETUNE_DEFAULTS`.

    The run's provenance records the start (``init_from``: path, SHA-256) and what was trained
    (``trainable``: mode, parts, number of parameters). Returns ``train``'s metrics."""
    body = read_checkpoint(model)
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    tc = {**FINETUNE_DEFAULTS, **(settings or {}), "trainable": trainable}
    if parts is not None:
        tc["parts"] = list(parts)
    return train({"model": body["config"], "train": tc}, data, out, resume=resume,
                 device=device, progress=progress, init_from=model)


def train(config, data: Showers | str | os.PathLike, out: str | os.PathLike, *,
          resume: bool = False, device=None, progress: bool = True, init_from=None) -> dict:
    """Train a model and write ``out/model.pt`` (EMA weights), ``out/last.pt`` (training state),
    ``out/log.csv`` and ``out/config.yaml``; returns the metrics stored in the checkpoint.

    Args:
        config: YAML path or dict with ``model`` and ``train`` sections (see ``configs/``).
        data: physics-frame showers, or a Parquet file/shard directory holding them.
        out: run directory.
        resume: continue from ``out/last.pt`` (bit-exact on the same device and thread count).
        device: torch device (default: CUDA when available, else CPU).
        init_from: checkpoint overriding ``train.init_from`` of the config.
    """
    cfg = load_config(config)
    tc = cfg["train"]
    if init_from is not None:
        tc["init_from"] = str(init_from)
    ranks = Ranks.from_env()
    device = ranks.device(resolve_device(device))
    if tc["threads"]:
        torch.set_num_threads(int(tc["threads"]))
    elif ranks.world > 1 and device.type == "cpu":  # the ranks of a node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world))
    ranks.start(device)
    try:
        return _train(cfg, tc, data, Path(out), resume, device, progress, ranks)
    finally:
        ranks.stop()


def _train(cfg, tc, data, out: Path, resume: bool, device, progress: bool, ranks: Ranks) -> dict:
    from tqdm.auto import tqdm

    stream = bool(tc["stream"]) or ranks.world > 1
    provenance = {}
    if stream:
        data = training_path(data)
    if not isinstance(data, Showers):
        from pcshower.io import read_metadata, read_parquet

        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"training data {path} does not exist")
        data_meta = read_metadata(path)
        provenance = {"data_path": str(path), "data_metadata": _jsonable(data_meta)}
        if not stream:
            data = read_parquet(path)
    if not stream:
        _check_physics(data)
        provenance["particles"] = sorted(set(int(p) for p in data.particle.unique().tolist()))
        # a data set at one azimuth teaches nothing about phi: generate() then conditions on it
        provenance["phi_range_rad"] = [float(data.phi.min()), float(data.phi.max())]
        if len(data) < 2:
            raise ValueError(f"training needs at least 2 showers, got {len(data)}")
    last = out / "last.pt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no training state {last} to resume from")
    if not resume and last.exists():
        raise ValueError(f"run directory {out} already holds a training run; pass --resume to "
                         f"continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(int(tc["seed"]))
    torch.manual_seed(int(tc["seed"]))  # parameter initialisation
    if not stream:
        perm = torch.randperm(len(data), generator=gen)
        n_val = int(round(len(data) * float(tc["val_fraction"])))
        n_val = min(n_val, len(data) - 1)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        train_set, val_set = data[train_idx], data[val_idx] if n_val else None
        fingerprint = _fingerprint(data)
        del data  # train_set and val_set are copies: keep one set of points in memory

    model = ShowerModel(cfg["model"])
    parts = list(tc["parts"])
    if not parts or set(parts) - {"flow", "points"}:
        raise ValueError(f"train.parts must list 'flow' and/or 'points', got {parts}")
    # measured first, then overwritten by an init checkpoint's normalisation where it fits (a
    # flow with other shape features keeps the statistics measured here)
    if stream:
        # the same validation draw from gen as in memory; normalisation summed over the ranks
        sd = stream_training_data(data, model, tc, ranks, gen, progress)
        n_val, fingerprint = sd.n_val, sd.fingerprint + [ranks.world]
        provenance["particles"], provenance["phi_range_rad"] = sd.particles, sd.phi_range
        if sd.n_train < 2:
            raise ValueError(f"training needs at least 2 showers, got {sd.n_train}")
        provenance["streamed"] = {"ranks": ranks.world, "row_groups": len(sd.stream.units)}
        if ranks.world > 1:  # each rank its own draws (the same validation split on every rank)
            gen.manual_seed(int(np.random.SeedSequence([int(tc["seed"]), ranks.rank])
                                .generate_state(1, dtype=np.uint64)[0]))
    else:
        model.fit_normalization(train_set)
    teacher = _load_teacher(model, tc, device)
    if teacher is not None:
        provenance["teacher"] = {"path": str(tc["teacher"]),
                                 "sha256": teacher.checkpoint_info.get("sha256")}
        if not tc["init_from"]:
            tc["init_from"] = str(tc["teacher"])
    if tc["init_from"]:
        provenance["init_from"] = _init_from(model, tc["init_from"], refit_shape="flow" in parts)
    if teacher is not None:
        _check_teacher_normalization(model, teacher, tc["teacher"])
    provenance["objective"] = model.objective.name
    for name, net in (("flow", model.flow), ("points", model.points_net),
                      ("points", model.shape_embed)):
        if net is not None:
            net.requires_grad_(name in parts)
    if tc["trainable"] == "bias":
        keep = bias_parameters(model)
        for n, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and n in keep)
    learning = [p for p in model.parameters() if p.requires_grad]
    if not learning:
        raise ValueError(f"train.trainable: {tc['trainable']} with train.parts {parts} leaves no "
                         f"parameter to train")
    provenance["trainable"] = {"mode": tc["trainable"], "parts": parts,
                               "parameters": sum(p.numel() for p in learning),
                               "of": sum(p.numel() for p in model.parameters())}
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # the consistency target theta^-: its own EMA of the weights (target_decay > 0), else the
    # current weights without gradient (point_loss's default)
    target_decay = float(model.config["consistency"]["target_decay"])
    target = (copy.deepcopy(model).eval().requires_grad_(False)
              if model.objective.name == "consistency" and target_decay > 0 else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=tc["lr"], weight_decay=tc["weight_decay"])

    # shape features of every training shower, computed once (the flow sees large batches)
    shape = sd.shape if stream else model.codec.measure_showers(train_set)
    conditions = (sd.energy, sd.theta, sd.phi) if stream else (train_set.energy, train_set.theta,
                                                               train_set.phi)
    n_local = len(conditions[0])  # the flow's showers (this rank's part when streamed)
    shape_y = model.codec.encode(shape, torch.zeros(n_local)).to(device)
    # exact-zero fractions, dequantised afresh at each step (fraction_dequantize)
    zeros = model.codec.zero_fractions(shape).to(device) if model.codec.dequantize else None
    cond_all = model.condition(*(c.to(device) for c in conditions))
    n_train = sd.n_train if stream else len(train_set)
    flow_batch = ranks.share(int(tc["flow_batch"]), "flow_batch")
    # a flow-only run needs each shower's shape and conditions, not its points
    if not stream:
        train_set = train_set.to(device) if "points" in parts else None
    losses = _Losses(model)
    if ranks.world > 1:
        losses = torch.nn.parallel.DistributedDataParallel(
            losses, device_ids=[device.index] if device.type == "cuda" else None)

    step, elapsed, rows = 0, 0.0, []
    if resume:
        body = read_checkpoint(last)
        state = body.get("training_state")
        if state is None:
            raise CheckpointError(f"{last} holds no training state to resume from")
        if int(state.get("world", 1)) != ranks.world:
            raise ValueError(f"--resume: the run was made with {state.get('world', 1)} ranks; "
                             f"resume it with as many (torchrun --nproc-per-node), not "
                             f"{ranks.world}")
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"--resume: the training data differ from the run's data "
                             f"({state['fingerprint']} vs {fingerprint})")
        if body["config"] != model.config:
            raise ValueError("--resume: the model config differs from the run's config")
        model.load_state_dict(state["model"])
        ema.load_state_dict(checkpoint_state(body))
        if target is not None:
            target.load_state_dict(state["target"])
        opt.load_state_dict(state["optimizer"])
        mine = state["ranks"][ranks.rank] if "ranks" in state else state
        gen.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        rows = _read_log(out / "log.csv", step)
    if ranks.main:
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump({"model": model.config, "train": tc, "data": cfg["data"]}, f,
                           sort_keys=False)
    # a resumed stream continues after the batches already used (read again, not trained on)
    points_iter = itertools.islice(iter(sd.stream), step, None) if stream else None

    use_amp = bool(tc["amp"]) and device.type == "cuda"
    bar = tqdm(total=int(tc["steps"]), initial=step, disable=not (progress and ranks.main),
               desc="train", unit="step", dynamic_ncols=True)
    running = None
    t0 = time.perf_counter()
    while step < int(tc["steps"]):
        lr = _lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        fidx = torch.randint(n_local, (min(flow_batch, n_local),), generator=gen)
        if stream:
            points = next(points_iter)[1].to(device) if "points" in parts else None
        else:
            pidx = torch.randint(n_train, (min(int(tc["batch_showers"]), n_train),), generator=gen)
            points = train_set[pidx.to(device)] if "points" in parts else None
        u = torch.rand(fidx.numel(), generator=gen)
        y = shape_y[fidx.to(device)].clone()
        y[:, 0] = (shape.num_points[fidx].float() + u).log().to(device)
        if zeros is not None:
            y = model.codec.dequantize_zeros(y, zeros[fidx.to(device)],
                                             torch.rand(y.shape, generator=gen).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pcond = None
            if points is not None:
                pcond = (model.condition(points.energy, points.theta, points.phi) if stream
                         else cond_all[pidx.to(device)])
            flow_loss, point_loss = losses(y if "flow" in parts else None,
                                           cond_all[fidx.to(device)], points, pcond,
                                           _device_gen(gen, device), teacher, target)
            loss = flow_loss + point_loss
        # the ranks' mean (the loss of the global batch): logged, and checked on every rank
        shown = ranks.mean(torch.stack([loss.detach(), flow_loss.detach(), point_loss.detach()]))
        if not torch.isfinite(shown).all():
            raise FloatingPointError(
                f"training stopped at step {step}: the loss is {float(shown[0]):g} (flow "
                f"{float(shown[1]):g}, points {float(shown[2]):g}); lower train.lr or check the "
                f"data for NaN/inf or empty showers. {out / 'last.pt'} holds the last good state "
                "(if a checkpoint was written)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(tc["grad_clip"]))
        opt.step()
        decay = min(float(tc["ema_decay"]), (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
            if target is not None:
                for pt, pm in zip(target.parameters(), model.parameters()):
                    pt.lerp_(pm, 1 - target_decay)
        step += 1
        values = [float(v) for v in shown]
        running = values if running is None else [0.98 * r + 0.02 * v for r, v in zip(running, values)]
        if step % int(tc["log_every"]) == 0 or step == int(tc["steps"]):
            rows.append({"step": step, "loss": values[0], "flow_loss": values[1],
                         "point_loss": values[2], "lr": lr, "grad_norm": float(grad_norm),
                         "elapsed_s": round(elapsed + time.perf_counter() - t0, 2)})
            if ranks.main:
                _write_log(out / "log.csv", rows)
            bar.set_postfix(flow=f"{running[1]:.3f}", points=f"{running[2]:.3f}")
        bar.update(1)
        if step % int(tc["checkpoint_every"]) == 0 or step == int(tc["steps"]):
            now = elapsed + time.perf_counter() - t0
            states = ranks.gather({"generator": gen.get_state(), "torch_rng": torch.get_rng_state()})
            if ranks.main:
                _save_state(last, model, ema, opt, gen, step, now, fingerprint, provenance, target,
                            ranks=states if ranks.world > 1 else None)
    bar.close()
    elapsed += time.perf_counter() - t0

    metrics = {"steps": step, "train_showers": n_train, "val_showers": int(n_val),
               "train_time_s": round(elapsed, 1), "device": str(device),
               "final_flow_loss_smoothed": running[1] if running else None,
               "final_point_loss_smoothed": running[2] if running else None}
    if ranks.world > 1:
        # DDP keeps the ranks' weights equal by construction; check it rather than trust it
        digests = ranks.gather(_digest(ema))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the {ranks.world} ranks ended with different weights "
                               f"({digests}); the run is not data-parallel as it should be")
        metrics["ranks"] = ranks.world
    if ranks.main:
        if stream:
            val_set = sd.val_showers() if n_val else None
        if val_set is not None and len(val_set):
            metrics.update(_validate(ema, val_set.to(device), seed=int(tc["seed"]),
                                     teacher=teacher))
        save_checkpoint(out / "model.pt", model_payload(ema, metrics=metrics,
                                                        provenance=provenance))
        log.info("training done: %s", metrics)
    ranks.barrier()  # every rank returns once model.pt is written
    return metrics


#: Model config keys that define the flow's features: a flow trained on others is no start.
_SHAPE_KEYS = ("slices", "rings", "fraction_eps", "fraction_dequantize")


def _init_from(model: ShowerModel, path, refit_shape: bool = False) -> dict:
    """Copy normalisation and every matching weight of checkpoint ``path`` into ``model``.
    ``refit_shape``: the flow is trained here, so shape statistics of another size (other flow
    features) may stay as measured on this data; every other statistic must fit. If the
    checkpoint's flow features differ (other ``slices``, ``rings`` or ``fraction_eps``), neither
    its flow nor its shape statistics are copied (the flow then needs training: ``refit_shape``)."""
    body = read_checkpoint(path)
    source = checkpoint_state(body)
    theirs = merge_config(DEFAULT_MODEL_CONFIG, body["config"])
    new_features = [k for k in _SHAPE_KEYS if theirs[k] != model.config[k]]
    if new_features:
        if not refit_shape:
            raise ValueError(f"init_from {path}: its flow samples other shape features "
                             f"({', '.join(new_features)} differ), so the flow must be trained: "
                             f"add 'flow' to train.parts")
        source = {k: v for k, v in source.items() if not is_flow_state(k)}
    target = model.state_dict()
    grown = int(model.config["epic"]["shape_embed"]) - int(theirs["epic"]["shape_embed"])
    if grown > 0:
        source = {k: _widen_conditioning(v, target[k], grown) if k.startswith("points_net.") and
                  k in target else v for k, v in source.items()}
    loaded = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    refit = FLOW_NORM_KEYS if refit_shape else frozenset()
    missing = [k for k in target if k.startswith("norm.") and k not in loaded and k not in refit]
    if missing:
        raise ValueError(f"init_from {path}: its normalisation does not fit this model ({missing})")
    model.load_state_dict(loaded, strict=False)
    return {"path": str(path), "sha256": body["sha256"], "tensors_loaded": len(loaded),
            "tensors_total": len(target), "new_shape_features": new_features,
            "metrics": body.get("metrics", {})}


def _load_teacher(model: ShowerModel, tc: dict, device):
    """The EDM teacher of a consistency-distillation run (``train.teacher``), in eval mode on
    ``device``; ``None`` for every other run. Refuses a run that needs one and has none, a
    teacher for a run that does not distil, and a teacher of another objective or schedule."""
    distils = (model.objective.name == "consistency"
               and model.config["consistency"]["mode"] == "distillation")
    path = tc["teacher"]
    if not distils:
        if path:
            raise ValueError(f"train.teacher is set ({path}) but the model does not distil (model "
                             f"objective {model.objective.name!r}; a teacher is for objective: "
                             "consistency with consistency.mode: distillation)")
        return None
    if not path:
        raise ValueError("consistency distillation needs an EDM teacher: set train.teacher to its "
                         "checkpoint (or consistency.mode: training to train without one)")
    from pcshower.models.checkpoint import load_model

    teacher = load_model(path, objective="edm")
    theirs = {k: teacher.config["edm"][k] for k in ("sigma_data", "sigma_min", "sigma_max", "rho")}
    ours = {k: model.config["edm"][k] for k in theirs}
    if theirs != ours:
        raise ValueError(f"train.teacher {path}: its noise schedule {theirs} differs from this "
                         f"model's edm section {ours}; a distilled model uses its teacher's")
    return teacher.to(device).requires_grad_(False)


def _check_teacher_normalization(model: ShowerModel, teacher: ShowerModel, path) -> None:
    """A student reads and writes points and conditions in its teacher's units: the point and
    condition statistics must be the teacher's (they are when the student starts from it)."""
    for name in ("point_mean", "point_std", "cond_stats"):
        mine = getattr(model.norm, name)
        if not torch.equal(mine, getattr(teacher.norm, name).to(mine.device)):
            raise ValueError(f"train.teacher {path}: the student's normalisation ({name}) is not "
                             f"the teacher's; start the student from the teacher (leave "
                             f"train.init_from empty) or from a checkpoint with its statistics")


def _widen_conditioning(theirs: torch.Tensor, ours: torch.Tensor, grown: int) -> torch.Tensor:
    """A point-network weight from a checkpoint whose conditioning vector was ``grown`` features
    shorter (a larger ``epic.shape_embed`` here). Every Linear of :class:`EPiCNetwork` takes the
    conditioning as the last block of its input, so the new inputs are the last columns: they
    start at zero and the network computes what the checkpoint's did until trained."""
    if theirs.dim() != 2 or ours.shape != (theirs.shape[0], theirs.shape[1] + grown):
        return theirs
    out = torch.zeros_like(ours)
    out[:, :theirs.shape[1]] = theirs
    return out


def _device_gen(gen: torch.Generator, device: torch.device):
    """The CPU generator drives everything on CPU; on CUDA a device generator is seeded from it
    each step (so the CPU generator's state still determines the whole run)."""
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(2 ** 62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def _validate(model: ShowerModel, val: Showers, seed: int, teacher=None) -> dict:
    """Held-out flow NLL and point loss (the model's objective) with the EMA weights (fixed
    noise draws)."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = model.codec.measure_showers(val)
    cond = model.condition(val.energy, val.theta, val.phi)
    y = model.codec.encode(shape).to(val.device)
    if model.codec.dequantize:
        y = model.codec.dequantize_zeros(y, model.codec.zero_fractions(shape).to(val.device),
                                         torch.rand(y.shape, generator=g).to(val.device))
    flow = float(model.flow_loss(y, cond))
    losses = [float(model.point_loss(part, model.condition(part.energy, part.theta, part.phi),
                                     _device_gen(g, val.device), teacher=teacher))
              for part in val.split(256) for _ in range(2)]
    return {"val_flow_loss": flow, "val_point_loss": sum(losses) / len(losses)}


def _save_state(path: Path, model, ema, opt, gen, step, elapsed, fingerprint, provenance,
                target=None, ranks: list | None = None) -> None:
    payload = model_payload(ema, provenance=provenance)
    payload["training_state"] = {
        "step": step, "elapsed_s": elapsed, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint}
    if ranks is not None:  # each rank's random state, to resume every rank where it was
        payload["training_state"].update(world=len(ranks), ranks=ranks)
    if target is not None:
        payload["training_state"]["target"] = target.state_dict()
    save_checkpoint(path, payload)


def _digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights and buffers (to compare the ranks' copies)."""
    import hashlib

    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Losses(torch.nn.Module):
    """The flow and point losses of one step as a module's forward, so that a distributed run
    wraps it in ``DistributedDataParallel`` (which averages the gradients over the ranks)."""

    def __init__(self, model: ShowerModel):
        super().__init__()
        self.model = model

    def forward(self, y, flow_cond, points, point_cond, generator, teacher=None, target=None):
        zero = torch.zeros((), device=flow_cond.device)
        flow = self.model.flow_loss(y, flow_cond) if y is not None else zero
        point = (self.model.point_loss(points, point_cond, generator, teacher=teacher,
                                       target=target) if points is not None else zero)
        return flow, point


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= up_to_step]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
