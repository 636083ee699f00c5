"""Select one loss's OOD score: each seed's calibrated model scored on the validation ID images and
the validation OOD sets (``data.ood_val``), the score chosen on their means over the seeds
(:func:`oodgate.measuring.evaluation.choose_score`); writes ``selection.json`` (the choice, every candidate
score's validation figures, and the record's fingerprint). It reads no test image: the evaluate
step reads the choice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from oodgate.base.config import AUTO_SCORE, Config
from oodgate.base.files import output_digests, write_json
from oodgate.base.numerics import write_provenance
from oodgate.base.records import Selected
from oodgate.data.prepared import load_prepared
from oodgate.learning import methods
from oodgate.learning.classifier import load_classifier
from oodgate.learning.training.engine import activate_numerics, inference_device
from oodgate.measuring import evaluation
from oodgate.running.steps.inputs import expected
from oodgate.running.steps.reuse import one_at_a_time, reusable, upstream

if TYPE_CHECKING:
    import torch

    from oodgate.learning.classifier import Classifier

RECORD = "selection.json"
CHOICE = "choice.json"  # what selection.json vouches for, and what the evaluate step reads


@one_at_a_time
def select(
    cfg: Config,
    loss_id: str,
    calibrate_dirs: Mapping[int, str | Path],
    prepared_dir: str | Path,
    out_dir: str | Path,
) -> Selected:
    """``calibrate_dirs``: the calibrated model of every seed of the loss. Refuses one made from
    other inputs than the current config's; returns the choice already in ``out_dir`` if it has
    this step's fingerprint."""
    out_dir = Path(out_dir)
    loss = cfg.losses[loss_id]
    seeds = cfg.seeds_of(loss_id)
    want = expected(cfg, loss_id, seeds[0], prepared_dir)
    previous = reusable(out_dir, RECORD, want.fingerprint["select"])
    if previous is not None:
        return Selected(**previous, dir=str(out_dir))
    (out_dir / RECORD).unlink(missing_ok=True)
    candidates = methods.METHODS.get(loss.method).scores
    sets = tuple(s.name for s in cfg.data.ood_val)
    per_seed = {}
    if loss.score == AUTO_SCORE and sets:
        activate_numerics(cfg)
        bundle = load_prepared(prepared_dir)
        device, amp = inference_device(cfg)
        batch = cfg.train.eval_batch_size
        for seed in seeds:
            mine = expected(cfg, loss_id, seed, prepared_dir)
            found = upstream("calibrate", loss_id, seed, Path(calibrate_dirs[seed]), mine, ("calibrated.pt",))
            model = load_classifier(found.files["calibrated.pt"])
            temp = model.head.temperature.detach().cpu()

            def calibrated(
                x: torch.Tensor, model: Classifier = model, temp: torch.Tensor = temp
            ) -> torch.Tensor:
                return evaluation.raw_logits(model, x, batch, device, amp) / temp

            per_seed[seed] = evaluation.validation_figures(
                calibrated(bundle.val.x), {k: calibrated(v.x) for k, v in bundle.ood_val.items()}, candidates
            )
    choice = evaluation.choose_score(loss.score, candidates, per_seed, sets)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CHOICE, choice.record())
    result = Selected(
        loss=loss_id,
        fingerprint=want.fingerprint["select"],
        dir=str(out_dir),
        choice=choice.record(),
        inputs=want.inputs["select"],
        outputs=output_digests(out_dir, (CHOICE,)),
    )
    write_provenance(cfg, out_dir)
    write_json(out_dir / RECORD, result.record())  # last: the record marks a finished result
    return result
