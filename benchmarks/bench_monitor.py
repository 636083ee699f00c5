"""Images per second through the monitoring flow, and its fixed cost per batch (CPU).

Scores batches of several sizes with the project's registered champion (run `make run` first)
through ``flows.monitor.monitor``, the flow `make monitor` runs, against a copy of the tracking
database in a temporary directory (the project's monitoring history is not touched). One Prefect
temporary server serves every call (its start-up is reported apart). A line fitted to
(batch size, seconds) gives the fixed cost per batch (its intercept) and the images per second
(its slope); ``predict`` alone is timed on the largest batch for comparison.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_monitor.py [--sizes 200 1000 5000 20000]

``--false-alarms`` instead simulates the alert rule on in-distribution data (no model needed):
exchangeable scores, a threshold set on ``n`` validation scores as evaluation sets it, batches of
600, level 0.01, and prints how often each test alerts, for several validation-set sizes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from oodgate.base import numerics

numerics.apply()  # before NumPy and torch load: the kernels the pipeline computes with (oodgate.base.numerics)

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def batches(sizes: list[int], out: Path) -> list[Path]:
    """Test-split images tiled to each size, each tile shifted by one grey level so that no two
    batches share a digest (a batch already scored is not scored again)."""
    import torch

    prepared = next(
        (REPO / "artifacts" / "cache").glob("prepared-*/id.pt"), REPO / "artifacts/prepared/id.pt"
    )
    x = torch.load(prepared, weights_only=True)["test"]["x"].numpy()[:, 0]
    paths = []
    for n in sizes:
        reps = -(-n // len(x))
        tiles = [np.clip(x.astype(np.int16) + (i % 3), 0, 255).astype(np.uint8) for i in range(reps)]
        p = out / f"batch{n}.npz"
        np.savez(p, x=np.concatenate(tiles)[:n])
        paths.append(p)
    return paths


def false_alarms(
    val_sizes=(240, 1000, 5000), batch: int = 600, alpha: float = 0.01, sims: int = 2000
) -> None:
    from oodgate.measuring import metrics
    from oodgate.watching.monitoring import rate_test, validation_counts

    print(
        f"| validation images | binomial alerts | beta-binomial alerts |  (batches of {batch}, level {alpha}, {sims} draws)"
    )
    print("|---|---|---|")
    for n in val_sizes:
        rng = np.random.default_rng(1)
        alerts = {"binomial": 0, "beta_binomial": 0}
        for _ in range(sims):
            val, scores = rng.normal(size=n), rng.normal(size=batch)
            threshold = metrics.ood_threshold(val, tpr=0.95)
            flagged = int((scores < threshold).sum())
            counts = validation_counts(val, threshold)
            for method in alerts:
                alerts[method] += (
                    rate_test(flagged, batch, alpha, method=method, validation=counts).alert != "none"
                )
        print(f"| {n} | {alerts['binomial'] / sims:.4f} | {alerts['beta_binomial'] / sims:.4f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000, 20000])
    p.add_argument("--false-alarms", action="store_true", help="simulate the alert rule's false alarms")
    args = p.parse_args(argv)
    if args.false_alarms:
        false_alarms()
        return 0
    from oodgate.base.project import telemetry_off

    telemetry_off()
    if not (REPO / "mlflow.db").is_file():
        print("error: no mlflow.db: run `make run` first (it registers the champion)", file=sys.stderr)
        return 1
    import os

    from prefect.testing.utilities import prefect_test_harness

    from flows.monitor import monitor
    from oodgate_mlflow import monitor_runs, tracking
    from oodgate_mlflow.champion import load_champion

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(REPO / "mlflow.db", root / "mlflow.db")
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        paths = batches(args.sizes, root)
        t0 = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=60):
            startup = time.perf_counter() - t0
            monitor(batch=str(paths[0]), root=str(root))  # warm: imports, the model's first load
            rows = []
            for n, path in zip(args.sizes, paths):
                t = time.perf_counter()
                s = monitor(batch=str(path), root=str(root))
                rows.append((n, time.perf_counter() - t, s["ood_rate"], s["test"]["alert"]))
            model, version = load_champion(uri=tracking.connect(root=root))
            x = np.load(paths[-1])["x"][:, None].astype(np.float32) / 255.0
            t = time.perf_counter()
            monitor_runs.predict(model, x)
            predict_s = time.perf_counter() - t
    n = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] for r in rows])
    slope, intercept = np.polyfit(n, s, 1)
    print(f"champion: oodgate-classifier v{version}; Prefect test server start-up {startup:.1f} s\n")
    print("| images | flow s | images/s | OOD rate | alert |")
    print("|---|---|---|---|---|")
    for size, sec, rate, alert in rows:
        print(f"| {size} | {sec:.2f} | {size / sec:.0f} | {rate:.3f} | {alert} |")
    print(
        f"\nfit: fixed cost per batch {intercept:.2f} s, then {1 / slope:.0f} images/s; "
        f"predict alone on {args.sizes[-1]} images: {predict_s:.2f} s ({args.sizes[-1] / predict_s:.0f} images/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
