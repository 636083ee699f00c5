"""Evaluate one (loss, seed): test-split and OOD-test metrics of the calibrated model with the
loss's OOD score (chosen by the select step on validation data); writes ``metrics.json``, ``samples.pt`` (per-sample arrays for the gate's
bootstrap), ``plots/`` and ``evaluation.json`` (the record, with its fingerprint)."""

from __future__ import annotations

from pathlib import Path

import torch

from oodgate.base.config import Config
from oodgate.base.files import output_digests, read_json, torch_save, write_json
from oodgate.base.numerics import write_provenance
from oodgate.base.records import Evaluated
from oodgate.data.prepared import load_prepared
from oodgate.learning import methods
from oodgate.learning.classifier import load_classifier
from oodgate.learning.training.engine import activate_numerics, inference_device
from oodgate.measuring import evaluation
from oodgate.measuring import plots as plots_lib
from oodgate.running.steps.inputs import expected
from oodgate.running.steps.reuse import one_at_a_time, reusable, upstream

RECORD = "evaluation.json"
OUTPUTS = ("metrics.json", "samples.pt")  # what evaluation.json vouches for


@one_at_a_time
def evaluate(
    cfg: Config,
    loss_id: str,
    seed: int,
    calibrate_dir: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    select_dir: str | Path,
    plots: bool = True,
) -> Evaluated:
    """Scores the test split and the OOD sets with the loss's score, as the select step chose it in
    ``select_dir`` on validation data. Refuses a calibrated model or a choice made from other inputs
    than the current config's; returns the result already in ``out_dir`` if it has this step's
    fingerprint."""
    calibrate_dir, out_dir = Path(calibrate_dir), Path(out_dir)
    want = expected(cfg, loss_id, seed, prepared_dir)
    calibrated = upstream("calibrate", loss_id, seed, calibrate_dir, want, ("calibrated.pt",))
    model_file = calibrated.files["calibrated.pt"]
    selected = upstream("select", loss_id, seed, Path(select_dir), want, ("choice.json",))
    choice = evaluation.ScoreChoice.of(read_json(selected.files["choice.json"]))
    previous = reusable(out_dir, RECORD, want.fingerprint["evaluate"])
    if previous is not None:
        return Evaluated(**previous, dir=str(out_dir), metrics=read_json(out_dir / "metrics.json"))
    (out_dir / RECORD).unlink(missing_ok=True)
    activate_numerics(cfg)
    loss = cfg.losses[loss_id]
    model = load_classifier(model_file)
    bundle = load_prepared(prepared_dir)
    device, amp = inference_device(cfg)
    ev = evaluation.evaluate(
        model,
        bundle,
        score=choice.score,
        batch_size=cfg.train.eval_batch_size,
        device=device,
        amp=amp,
        candidates=methods.METHODS.get(loss.method).scores,
    )
    # the calibrated validation figures beside the test's: the deployable seed is chosen on them
    # (oodgate.gate.choose_seed), by the flow and by the DVC gate stage alike
    validation = {k: v for k, v in calibrated.record["metrics"].items() if k.startswith("val/")}
    validation.update(
        choice.metrics(seed)
    )  # selection/<score>/{fpr95,auroc}: this model's, on validation data
    write_json(out_dir / "metrics.json", {**ev.metrics, **validation})
    torch_save(  # atomic, as every result file
        {
            "logits": torch.from_numpy(ev.logits),
            "labels": torch.from_numpy(ev.labels),
            "id_scores": torch.from_numpy(ev.id_scores),
            "val_scores": torch.from_numpy(ev.val_scores),
            "ood_names": list(ev.ood_scores),
            "ood_groups": dict(bundle.ood_groups),
            "ood_scores": {k: torch.from_numpy(v) for k, v in ev.ood_scores.items()},
            "threshold": ev.threshold,
            "score": ev.score,
        },
        out_dir / "samples.pt",
    )
    if plots:
        plots_lib.write_all(ev, out_dir / "plots")
    result = Evaluated(
        loss=loss_id,
        seed=seed,
        fingerprint=want.fingerprint["evaluate"],
        dir=str(out_dir),
        score=ev.score,
        score_choice=choice.text(),
        threshold=ev.threshold,
        metrics={**ev.metrics, **validation},
        inputs=want.inputs["evaluate"],
        outputs=output_digests(out_dir, OUTPUTS),
    )
    write_provenance(cfg, out_dir)
    write_json(out_dir / RECORD, result.record())  # last: the record marks a finished result
    return result
