"""Validation of generated showers against a reference: observables, metrics with statistical floors, plots, report.

The names below are imported on first use (PEP 562), so that a command that only registers
``pcshower evaluate`` (every ``pcshower`` command builds the whole parser) does not import the
report's plotting stack (matplotlib: half a second of ``pcshower generate``'s start).
"""

from importlib import import_module

_WHERE = {
    "deepsets_auc": "classifier", "gbdt_auc": "classifier",
    "fpd": "distances", "frechet_distance": "distances", "kernel_sum": "distances",
    "kpd": "distances", "mmd2_unbiased": "distances",
    "compare_with_floor": "metrics", "separation_power": "metrics", "wasserstein_1d": "metrics",
    "Observables": "observables", "cell_observables": "observables",
    "deposit_observables": "observables", "geometry_cell_observables": "observables",
    "point_observables": "observables",
    "EvaluationSample": "report", "compare_samples": "report", "evaluate": "report",
    "sample_from_calochallenge": "report", "sample_from_hits": "report",
    "sample_from_showers": "report", "write_report": "report",
}

__all__ = [
    "Observables", "deposit_observables", "point_observables", "cell_observables",
    "geometry_cell_observables", "wasserstein_1d", "separation_power", "compare_with_floor",
    "frechet_distance", "mmd2_unbiased", "kernel_sum", "fpd", "kpd", "gbdt_auc", "deepsets_auc",
    "EvaluationSample", "sample_from_showers", "sample_from_hits", "sample_from_calochallenge",
    "compare_samples", "write_report", "evaluate",
]


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"pcshower.evaluate.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pcshower.evaluate' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
