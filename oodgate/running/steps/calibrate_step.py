"""Calibrate one (loss, seed): fit the temperature on validation logits; writes ``calibrated.pt``
and ``calibration.json`` (the record, with its fingerprint)."""

from __future__ import annotations

import time
from pathlib import Path

from oodgate.base.config import Config
from oodgate.base.files import output_digests, write_json
from oodgate.base.numerics import write_provenance
from oodgate.base.records import Calibrated
from oodgate.data.prepared import load_prepared
from oodgate.learning.classifier import load_classifier, save_classifier
from oodgate.learning.training import engine
from oodgate.learning.training.engine import activate_numerics, inference_device
from oodgate.measuring import evaluation
from oodgate.running.steps.inputs import expected
from oodgate.running.steps.reuse import one_at_a_time, reusable, upstream

RECORD = "calibration.json"
MODEL = "calibrated.pt"


@one_at_a_time
def calibrate(
    cfg: Config, loss_id: str, seed: int, train_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path
) -> Calibrated:
    """Refuses a model in ``train_dir`` trained under other inputs than the current config's
    (:class:`~oodgate.base.records.StaleResultError`); returns the result already in ``out_dir`` if
    it has this step's fingerprint."""
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    want = expected(cfg, loss_id, seed, prepared_dir)
    best = upstream("train", loss_id, seed, train_dir, want, (engine.BEST,)).files[engine.BEST]
    previous = reusable(out_dir, RECORD, want.fingerprint["calibrate"])
    if previous is not None:
        return Calibrated(**previous, dir=str(out_dir))
    (out_dir / RECORD).unlink(missing_ok=True)
    t0 = time.perf_counter()
    activate_numerics(cfg)
    model = load_classifier(best)
    bundle = load_prepared(prepared_dir, with_ood=False)
    device, amp = inference_device(cfg)
    cal = evaluation.calibrate(
        model, bundle, cfg.calibration.objective, cfg.train.eval_batch_size, device=device, amp=amp
    )
    save_classifier(model, out_dir / MODEL)
    result = Calibrated(
        loss=loss_id,
        seed=seed,
        fingerprint=want.fingerprint["calibrate"],
        dir=str(out_dir),
        objective=cal.objective,
        metrics=cal.metrics(),
        inputs=want.inputs["calibrate"],
        outputs=output_digests(out_dir, (MODEL,)),
        seconds=round(time.perf_counter() - t0, 3),
    )
    write_provenance(cfg, out_dir)
    write_json(out_dir / RECORD, result.record())  # last: the record marks a finished result
    return result
