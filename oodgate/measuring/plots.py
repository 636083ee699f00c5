"""Pictures a person would rather look at than read, and the data files behind them.

``write_all`` writes, for one evaluation: ``reliability.png`` (before/after calibration),
``roc.png`` (one curve per OOD set), ``scores.png`` (ID vs OOD score histograms), and the plain
data for ``dvc plots``: ``roc_<set>.csv`` (fpr,tpr), ``reliability.csv`` (bin, confidence,
accuracy, count, calibrated). Matplotlib runs headless (Agg) and is imported only here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, cast

import numpy as np

from oodgate.measuring.evaluation import Evaluation


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return cast(np.ndarray, e / e.sum(axis=1, keepdims=True))


def reliability_bins(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin ``(lo, hi]``: mean confidence, accuracy and count."""
    p = _softmax(np.asarray(logits, dtype=np.float64))
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = pred == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for b in range(n_bins):
        mask = (conf > edges[b]) & (conf <= edges[b + 1])
        n = int(mask.sum())
        rows.append(
            {
                "bin": b,
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "confidence": float(conf[mask].mean()) if n else float("nan"),
                "accuracy": float(correct[mask].mean()) if n else float("nan"),
                "count": n,
            }
        )
    return rows


def _plt() -> Any:  # matplotlib.pyplot, imported on first use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(ev: Evaluation, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written: list[Path] = []

    # Reliability diagrams, before and after calibration.
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    rows_out = []
    for ax, (title, z) in zip(axes, (("uncalibrated", ev.logits_uncalibrated), ("calibrated", ev.logits))):
        rows = reliability_bins(z, ev.labels)
        centers = [(r["lo"] + r["hi"]) / 2 for r in rows]
        ax.bar(
            centers,
            [0 if r["count"] == 0 else r["accuracy"] for r in rows],
            width=1 / 15,
            edgecolor="k",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set(
            title=f"{title} (T={1.0 if title == 'uncalibrated' else ev.temperature:.3f})",
            xlabel="confidence (max probability)",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(loc="upper left")
        rows_out += [{**r, "calibrated": title == "calibrated"} for r in rows]
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    written.append(out_dir / "reliability.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    written.append(_write_csv(out_dir / "reliability.csv", rows_out))

    # ROC curves (ID positive) and score histograms, one per OOD set.
    if ev.ood_scores:
        from sklearn.metrics import roc_curve

        fig, ax = plt.subplots(figsize=(5, 4.5))
        for name, s in ev.ood_scores.items():
            y = np.r_[np.ones(len(ev.id_scores)), np.zeros(len(s))]
            fpr, tpr, _ = roc_curve(y, np.r_[ev.id_scores, s], drop_intermediate=True)
            ax.plot(fpr, tpr, label=name)
            written.append(
                _write_csv(out_dir / f"roc_{name}.csv", [{"fpr": a, "tpr": b} for a, b in zip(fpr, tpr)])
            )
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.set(
            title=f"ROC, ID positive (score: {ev.score})", xlabel="FPR (OOD accepted)", ylabel="TPR (ID kept)"
        )
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "roc.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        all_s = np.concatenate([ev.id_scores, *ev.ood_scores.values()])
        bins = np.linspace(np.percentile(all_s, 0.5), np.percentile(all_s, 99.5) + 1e-9, 50)
        ax.hist(ev.id_scores, bins=bins, density=True, alpha=0.6, label="in-distribution (test)")
        for name, s in ev.ood_scores.items():
            ax.hist(s, bins=bins, density=True, histtype="step", lw=1.5, label=name)
        ax.axvline(ev.threshold, color="k", ls="--", lw=1, label="threshold (95% val ID kept)")
        ax.set(
            title=f"ID vs OOD scores ({ev.score})",
            xlabel="score (higher = in-distribution)",
            ylabel="density",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "scores.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path
