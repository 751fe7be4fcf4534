"""Validation of generated showers against a reference: observables, metrics with statistical floors, plots, report."""

from pcshower.evaluate.classifier import deepsets_auc, gbdt_auc
from pcshower.evaluate.distances import fpd, frechet_distance, kernel_sum, kpd, mmd2_unbiased
from pcshower.evaluate.metrics import compare_with_floor, separation_power, wasserstein_1d
from pcshower.evaluate.observables import (Observables, cell_observables, deposit_observables,
                                           geometry_cell_observables, point_observables)
from pcshower.evaluate.report import (EvaluationSample, compare_samples, evaluate,
                                      sample_from_calochallenge, sample_from_hits,
                                      sample_from_showers, write_report)

__all__ = [
    "Observables", "deposit_observables", "point_observables", "cell_observables",
    "geometry_cell_observables", "wasserstein_1d", "separation_power", "compare_with_floor",
    "frechet_distance", "mmd2_unbiased", "kernel_sum", "fpd", "kpd", "gbdt_auc", "deepsets_auc",
    "EvaluationSample", "sample_from_showers", "sample_from_hits", "sample_from_calochallenge",
    "compare_samples", "write_report", "evaluate",
]
