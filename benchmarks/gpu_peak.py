"""Network points per second of the GPU bench runs under OUT, against the device's bf16 matrix
peak (called by benchmarks/gpu_run.sh): EPiC does about 2 FLOP per weight per point and call."""

import json
import pathlib
import sys

from pcshower.models.generate import load_default_model

PEAK = 790e12  # H200 dense bf16 matrix peak, FLOP/s (the device notes of this project)


def main(out: str) -> None:
    model = load_default_model()
    flop = 2 * sum(p.numel() for n, p in model.points_net.named_parameters()
                   if n.endswith("weight"))
    for f in sorted(pathlib.Path(out).glob("bench_*/bench_*.json")):
        result = json.loads(f.read_text())
        for row in result["runs"]:
            per_call_s = row["points_ms"] / 1e3 / max(row.get("network_calls") or 1, 1)
            rate = row.get("network_points_per_shower", float("nan")) / max(per_call_s, 1e-12)
            print(f"{result['dtype']:9s} steps {row['steps']:2d} batch {row['batch']:5d}: "
                  f"{rate:.3g} network points/s, {rate * flop / 1e12:.3g} TFLOP/s "
                  f"({100 * rate * flop / PEAK:.2g} % of the bf16 peak), generate() "
                  f"{row['end_to_end_ms']:.3g} ms/shower")


if __name__ == "__main__":
    main(sys.argv[1])
