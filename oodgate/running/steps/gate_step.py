"""Gate: every candidate against the baseline (per-seed metrics and samples), and the comparison table."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oodgate.base import numerics
from oodgate.base.config import Config
from oodgate.base.files import read_json
from oodgate.base.records import Evaluated
from oodgate.deciding.gate import Decision, SampleSet, SeedChoice, choose_seed, decide_all, rank_key
from oodgate.learning import methods
from oodgate.measuring.metrics import OOD_SUMMARIES, aggregate
from oodgate.running.steps.inputs import expected
from oodgate.running.steps.reuse import upstream


def collect(
    cfg: Config, evaluate_dir: Callable[[str, int], str | Path], prepared_dir: str | Path
) -> list[Evaluated]:
    """The evaluation of every (loss, seed) of the config, from ``evaluate_dir(loss, seed)``; refuses
    one computed from other inputs than the current ones (a stage that was not re-run)."""

    out = []
    for loss_id in cfg.loss_ids():
        for seed in cfg.seeds:
            d = Path(evaluate_dir(loss_id, seed))
            want = expected(cfg, loss_id, seed, prepared_dir)
            found = upstream("evaluate", loss_id, seed, d, want, ("samples.pt", "metrics.json"))
            metrics = read_json(found.files["metrics.json"])
            out.append(Evaluated(**found.record, dir=str(d), metrics=metrics))
    return out


# ---------------------------------------------------------------- the report
@dataclass(frozen=True)
class LossDecision:
    """The gate's decision on one candidate: promoted or not, every reason, the evidence
    (``gate/<metric>/{gain,bound,lower,p_value}``, ``gate/p_value``, ``gate/p_adjusted``), each
    criterion's test and bound, which two models were compared (model-level evidence) and the
    seed-level evidence reported beside it."""

    promote: bool
    reasons: tuple[str, ...]
    evidence: dict[str, float]
    tests: dict[str, str]
    compared: str = ""
    seed_level: tuple[str, ...] = ()
    by_metric: dict[str, str] = field(default_factory=dict)  # per criterion, its reason

    @classmethod
    def of(cls, d: Decision) -> LossDecision:
        return cls(
            promote=d.promote,
            reasons=tuple(d.reasons),
            evidence=d.metrics(),
            tests=d.tests(),
            compared=d.compared,
            seed_level=tuple(d.seed_level),
            by_metric=d.by_metric(),
        )

    def record(self) -> dict[str, object]:
        """As ``gate.json`` holds it: the fields, the reasons as lists."""
        record = {**asdict(self), "reasons": list(self.reasons), "seed_level": list(self.seed_level)}
        del record["by_metric"]  # the reasons again, by criterion
        return record


@dataclass(frozen=True)
class GateReport:
    """Every candidate against the baseline, and what the flow and the CLI report of it."""

    baseline: str
    rule: str  # the rule in one line (:func:`rule_text`)
    evidence: str  # gate.evidence: models or seeds
    models: dict[str, SeedChoice]  # per loss: its deployable model's seed, chosen on validation data
    points: dict[str, dict[str, float]]  # per loss: its deployable model's metrics
    per_seed: dict[str, list[dict[str, float]]]  # per loss: every seed's metrics, in seed order
    decisions: dict[str, LossDecision]
    promoted: tuple[str, ...]  # best first
    best: str | None  # the best promoted candidate
    # the run's best candidate (registered as the challenger): the best promoted one, else the one
    # with the strongest evidence
    challenger: str | None
    means: dict[str, dict[str, float]]
    stds: dict[str, dict[str, float]]
    seeds: dict[str, int]  # how many seeds each loss was gated on
    config_seeds: tuple[int, ...]  # the config's seeds
    confidence: float | None
    table: str  # the comparison table (:func:`comparison_table`)

    def record(self) -> dict[str, object]:
        """``gate.json``: the decisions, and the means of the table's metrics (no training seconds:
        the file is versioned, and a re-run must write the same bytes)."""
        keys = [key for _, key in TABLE_COLUMNS]
        return {
            "promoted": len(self.promoted),
            "best": self.best,
            "challenger": self.challenger,
            "evidence": self.evidence,
            "decisions": {k: d.record() for k, d in self.decisions.items()},
            "seeds": list(self.config_seeds),
            "models": {k: {"seed": c.seed, "why": c.why} for k, c in self.models.items()},
            "model": {k: {key: m[key] for key in keys if key in m} for k, m in self.points.items()},
            "mean": {k: {key: m[key] for key in keys if key in m} for k, m in self.means.items()},
        }


# ---------------------------------------------------------------- gate
def load_samples(evaluate_dir: str | Path) -> SampleSet:
    """The per-sample arrays the evaluate step saved in ``samples.pt``."""
    import torch

    d = torch.load(Path(evaluate_dir) / "samples.pt", weights_only=True)
    return SampleSet(
        logits=d["logits"].numpy(),
        labels=d["labels"].numpy(),
        id_scores=d["id_scores"].numpy(),
        ood_scores={k: d["ood_scores"][k].numpy() for k in d["ood_names"]},
        groups=dict(d["ood_groups"]),
    )


def gate(
    cfg: Config,
    metrics_by_loss: Mapping[str, list[dict[str, float]]],
    samples_by_loss: Mapping[str, list[SampleSet]] | None = None,
    scores: Mapping[str, str] | None = None,
    seconds: Mapping[str, float] | None = None,
) -> GateReport:
    """Decide every candidate against the baseline (:func:`oodgate.deciding.gate.decide`: per-seed metrics,
    and with ``gate.confidence`` the per-sample arrays of every seed). The report's ``table`` is the
    comparison table (``scores``: per loss, its score and why, :meth:`oodgate.measuring.evaluation.ScoreChoice.text`;
    training ``seconds`` per loss; both optional)."""

    numerics.activate(cfg.numerics.mode, cfg.numerics.threads)  # the bootstrap and tests: NumPy, SciPy
    # a single imported checkpoint is one model, however many seeds were evaluated
    single = {k for k in metrics_by_loss if k in cfg.losses and len(cfg.seeds_of(k)) < len(cfg.seeds)}
    metrics_by_loss = {k: list(v[:1]) if k in single else v for k, v in metrics_by_loss.items()}
    if samples_by_loss is not None:
        samples_by_loss = {k: list(v[:1]) if k in single else v for k, v in samples_by_loss.items()}
    base_id = cfg.gate.baseline
    if base_id not in metrics_by_loss:
        raise ValueError(f"no metrics for the baseline {base_id!r}; evaluate it before gating")
    metrics_by_loss = {k: [_with_default_score(cfg, k, m) for m in v] for k, v in metrics_by_loss.items()}
    aggregated = {k: aggregate(v) for k, v in metrics_by_loss.items()}
    means = {k: mean for k, (mean, _) in aggregated.items()}
    stds = {k: std for k, (_, std) in aggregated.items()}
    seeds = {
        k: (cfg.seeds_of(k) if k in cfg.losses else cfg.seeds)[: len(v)] for k, v in metrics_by_loss.items()
    }
    models = {k: choose_seed(dict(zip(seeds[k], metrics_by_loss[k]))) for k in metrics_by_loss}
    chosen = {k: seeds[k].index(models[k].seed) for k in metrics_by_loss}
    points = {k: dict(metrics_by_loss[k][chosen[k]]) for k in metrics_by_loss}
    names = {k: f"{k} seed {models[k].seed}" for k in metrics_by_loss}
    decisions = decide_all(metrics_by_loss, base_id, cfg.gate, samples_by_loss, chosen, names)
    # the models are ranked by what is compared: the deployable models' metrics, or the means
    ranked = points if cfg.gate.evidence == "models" else means
    promoted = sorted((k for k, d in decisions.items() if d.promote), key=lambda k: rank_key(ranked[k]))
    return GateReport(
        baseline=base_id,
        rule=rule_text(cfg),
        evidence=cfg.gate.evidence,
        models=models,
        points=points,
        per_seed={k: [dict(m) for m in v] for k, v in metrics_by_loss.items()},
        decisions={k: LossDecision.of(d) for k, d in decisions.items()},
        promoted=tuple(promoted),
        best=promoted[0] if promoted else None,
        challenger=promoted[0] if promoted else strongest(decisions, ranked),
        means=means,
        stds=stds,
        seeds={k: len(v) for k, v in metrics_by_loss.items()},
        config_seeds=tuple(cfg.seeds),
        confidence=cfg.gate.confidence,
        table=comparison_table(means, stds, scores, seconds),
    )


def _with_default_score(cfg: Config, loss_id: str, m: Mapping[str, float]) -> dict[str, float]:
    """The metrics with the method's own default score's mean FPR95 under :data:`DEFAULT_SCORE_FPR95`
    (the table shows it beside the chosen score's), where the evaluation reported it."""

    out = dict(m)
    loss = cfg.losses.get(loss_id)
    if loss is not None:
        key = f"scores/{methods.METHODS.get(loss.method).default_score}/ood/mean/fpr95"
        if key in m:
            out[DEFAULT_SCORE_FPR95] = m[key]
    return out


def strongest(decisions: Mapping[str, Decision], means: Mapping[str, Mapping[str, float]]) -> str | None:
    """The candidate whose evidence is strongest (:meth:`oodgate.deciding.gate.Decision.strength`; ties: the
    better means, :func:`oodgate.deciding.gate.rank_key`)."""
    if not decisions:
        return None
    return max(decisions, key=lambda k: (decisions[k].strength(), tuple(-x for x in rank_key(means[k]))))


def rule_text(cfg: Config) -> str:
    """The gate's rule in one line (the report's header, the registry's descriptions)."""
    g = cfg.gate
    fpr = {"mean": "mean FPR95", "groups": "near- and far-OOD FPR95", "worst": "worst-set FPR95"}[
        g.fpr95.over
    ]
    parts = []
    for label, c in (("accuracy", g.accuracy), ("calibrated ECE", g.ece), (fpr, g.fpr95)):
        parts.append(
            f"{label} {'superior by' if c.test == 'superior' else 'non-inferior within'} {c.margin:g}"
        )
    if g.evidence == "models":
        evidence = (
            f"each with {g.confidence:.0%} confidence, the deployable models paired on the same test and OOD "
            "images, Holm over the candidates"
            if g.confidence is not None
            else "on the deployable models' metrics only (gate.confidence: null)"
        )
        means = "; and all three better than the baseline model's" if g.better_means else ""
    else:
        evidence = (
            f"each with {g.confidence:.0%} confidence over seeds and test samples, Holm over the candidates"
            if g.confidence is not None
            else "on the means over seeds only (gate.confidence: null)"
        )
        means = "; and all three means better than the baseline's" if g.better_means else ""
    return f"{', '.join(parts)}, {evidence}{means}"


def gate_markdown(report: GateReport) -> str:
    """The gate's decision for every candidate, with every reason, as a markdown section."""
    lines = [f"## Gate (baseline: {report.baseline}; {report.rule})", ""]
    if report.evidence == "models":
        lines += ["Deployable models (one seed per loss, chosen on validation data only):", ""]
        lines += [f"- {k}: seed {c.seed} ({c.why})" for k, c in report.models.items()]
        lines.append("")
    for loss_id, d in report.decisions.items():
        head = f"- **{loss_id}**: {'PROMOTE' if d.promote else 'REJECT'}"
        lines.append(f"{head} ({d.compared})" if d.compared else head)
        lines += [f"    - {r}" for r in d.reasons]
        if d.seed_level:
            lines.append("    - beside it, not deciding:")
            lines += [f"        - {r}" for r in d.seed_level]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reports
DEFAULT_SCORE_FPR95 = "default_score/ood/mean/fpr95"  # the method's own default score's mean FPR95

TABLE_COLUMNS = (
    ("accuracy", "test/accuracy"),
    ("ECE", "test/ece"),
    ("ECE uncal.", "test/ece_uncalibrated"),
    ("NLL", "test/nll"),
    ("mean FPR95", "ood/mean/fpr95"),
    ("mean FPR95, default score", DEFAULT_SCORE_FPR95),
    ("near FPR95", "ood/near/fpr95"),
    ("far FPR95", "ood/far/fpr95"),
    ("worst FPR95", "ood/worst/fpr95"),
    ("mean AUROC", "ood/mean/auroc"),
)


def comparison_table(
    means: Mapping[str, Mapping[str, float]],
    stds: Mapping[str, Mapping[str, float]] | None = None,
    scores: Mapping[str, str] | None = None,
    seconds: Mapping[str, float] | None = None,
    per_set: bool = True,
) -> str:
    """A markdown table: one row per loss, the gate's metrics first (the summaries over OOD sets
    whose groups are present), then FPR95 per OOD set."""
    first = next(iter(means.values()))
    sets = sorted(
        {k.split("/")[1] for k in first if k.startswith("ood/") and k.endswith("/fpr95")} - set(OOD_SUMMARIES)
    )
    cols = [c for c in TABLE_COLUMNS if c[1] in first or not c[1].startswith("ood/")]
    cols += [(f"FPR95 {s}", f"ood/{s}/fpr95") for s in sets] if per_set else []
    head = ["loss", "score"] + [c for c, _ in cols] + (["train s"] if seconds else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss_id, m in means.items():
        cells = [loss_id, (scores or {}).get(loss_id, "")]
        for _, key in cols:
            v = m.get(key, math.nan)
            sd = (stds or {}).get(loss_id, {}).get(key)
            cells.append(f"{v:.4f}" + (f" ± {sd:.4f}" if sd else ""))
        if seconds:
            cells.append(f"{seconds.get(loss_id, math.nan):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
