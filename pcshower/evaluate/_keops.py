"""Whether KeOps can run on a device, decided by a probe in a child process (cached).

pykeops 2.3's GPU JIT was seen to die with SIGSEGV on a CUDA 13 machine; a segfault cannot be
caught in-process, so the first use on a device runs one small reduction in a child Python
process and checks its answer against torch. The verdict is cached in memory and in
``$XDG_CACHE_HOME/pcshower/keops_probe.json`` (keyed by pykeops/torch versions and the device),
and ``PCSHOWER_KEOPS=0`` (never) / ``=1`` (always, no probe) override it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["keops_available", "probe_key"]

log = logging.getLogger(__name__)
_MEMO: dict[str, bool] = {}

_PROBE = r"""
import sys, torch
from pykeops.torch import LazyTensor
dev = torch.device(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 3, generator=g, dtype=torch.float64)
y = torch.randn(200, 3, generator=g, dtype=torch.float64)
X = LazyTensor(x.to(dev)[:, None, :]); Y = LazyTensor(y.to(dev)[None, :, :])
got = (((X * Y).sum(-1) / 3 + 1) ** 3).sum(dim=1).cpu().flatten()
want = ((x @ y.T / 3 + 1) ** 3).sum(1)
sys.exit(0 if torch.allclose(got, want, rtol=1e-6, atol=1e-8) else 3)
"""


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcshower" / "keops_probe.json"


def probe_key(device: torch.device) -> str:
    """Cache key: pykeops and torch versions plus the device (GPU name and CUDA version)."""
    try:
        from importlib.metadata import version
        keops_version = version("pykeops")
    except Exception:  # noqa: BLE001 - not installed: the key is never used
        keops_version = "none"
    dev = torch.device(device)
    what = "cpu"
    if dev.type == "cuda":
        what = f"cuda:{torch.cuda.get_device_name(dev)}:{torch.version.cuda}"
    return f"pykeops={keops_version};torch={torch.__version__};{what}"


def _run_probe(device: torch.device, timeout_s: float) -> bool:
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep the CPU probe away from a crashing GPU JIT
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(device)], env=env,
                              capture_output=True, timeout=timeout_s, text=True)
    except (subprocess.TimeoutExpired, OSError) as err:
        log.warning("KeOps probe on %s did not finish (%s): using the torch fallback", device, err)
        return False
    if proc.returncode != 0:
        log.warning("KeOps cannot run on %s (probe exit code %s): using the torch fallback. %s",
                    device, proc.returncode, proc.stderr.strip().splitlines()[-1:] or "")
    return proc.returncode == 0


def keops_available(device: torch.device | str = "cpu", *, timeout_s: float = 300.0) -> bool:
    """True when pykeops is installed and a probe reduction on ``device`` succeeded."""
    forced = os.environ.get("PCSHOWER_KEOPS")
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device)
    try:
        import pykeops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no KeOps
        return False
    key = probe_key(device)
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file()
    cache = {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if key in cache:
        _MEMO[key] = bool(cache[key])
        return _MEMO[key]
    ok = _run_probe(device, timeout_s)
    _MEMO[key] = ok
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = ok
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a probe next time
    return ok
