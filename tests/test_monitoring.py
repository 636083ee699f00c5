"""The monitoring core: the OOD-rate test's reference values and error rates, and reading batches."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from oodgate.base.config import ConfigError, parse_config
from oodgate.measuring import metrics
from oodgate.watching.monitoring import BatchError, load_batch, rate_test, validation_counts

SHAPE = (1, 8, 8)


# ------------------------------------------------------------------ the test of the OOD rate
def test_binomial_p_value_is_the_smaller_exact_tail_doubled():
    for flagged in (0, 3, 30, 45, 80):
        t = rate_test(flagged, 600, alpha=0.01)
        upper = stats.binomtest(flagged, 600, 0.05, alternative="greater").pvalue
        lower = stats.binomtest(flagged, 600, 0.05, alternative="less").pvalue
        assert t.p_value == pytest.approx(min(1.0, 2 * min(upper, lower)), rel=1e-9)
        assert t.expected == pytest.approx(0.05)
    assert rate_test(30, 600, alpha=0.01).alert == "none"
    assert rate_test(60, 600, alpha=0.01).alert == "high"
    assert rate_test(8, 600, alpha=0.01).alert == "low"
    assert rate_test(60, 600, alpha=0.01, expected=0.1).alert == "none"  # a configured expected rate


def test_beta_binomial_matches_its_pmf_and_is_wider_than_the_binomial():
    n_val, k_val, m = 240, 12, 600
    t = rate_test(50, m, alpha=0.01, method="beta_binomial", validation=(n_val, k_val))
    pmf = [stats.betabinom.pmf(j, m, k_val + 1, n_val - k_val) for j in range(m + 1)]
    assert t.p_value == pytest.approx(2 * sum(pmf[50:]), rel=1e-9)
    assert t.expected == pytest.approx(13 / 241)
    # 50 of 600 (8.3%): drift to the binomial test, within the threshold's own noise to the beta-binomial
    assert rate_test(50, m, alpha=0.01).alert == "high" and t.alert == "none"
    assert rate_test(120, m, alpha=0.01, method="beta_binomial", validation=(n_val, k_val)).alert == "high"


def test_false_alarms_on_in_distribution_batches_stay_below_the_level():
    """Batches drawn with the expected rate: alerts in at most alpha of 2000 draws."""
    rng = np.random.default_rng(0)
    draws = rng.binomial(600, 0.05, size=2000)
    alerts = sum(rate_test(int(j), 600, alpha=0.05).alert != "none" for j in draws)
    assert alerts / len(draws) <= 0.05
    power = sum(rate_test(int(j), 600, alpha=0.05).alert == "high" for j in rng.binomial(600, 0.1, 500))
    assert power / 500 > 0.95  # a doubled OOD rate is found


def test_the_beta_binomial_keeps_its_level_when_the_threshold_comes_from_a_small_validation_set():
    """Exchangeable ID scores: 240 validation scores set the threshold (as evaluation does), a batch of
    600 is tested. The beta-binomial's false-alarm rate stays within alpha; the binomial's does not."""
    rng = np.random.default_rng(1)
    alpha, sims = 0.05, 1000
    alerts = {"binomial": 0, "beta_binomial": 0}
    for _ in range(sims):
        val, batch = rng.normal(size=240), rng.normal(size=600)
        threshold = metrics.ood_threshold(val, tpr=0.95)
        flagged = int((batch < threshold).sum())
        counts = validation_counts(val, threshold)
        alerts["binomial"] += rate_test(flagged, 600, alpha).alert != "none"
        alerts["beta_binomial"] += (
            rate_test(flagged, 600, alpha, method="beta_binomial", validation=counts).alert != "none"
        )
    assert alerts["beta_binomial"] / sims <= alpha
    assert alerts["binomial"] / sims > 2 * alpha  # measured: 0.281 (beta-binomial 0.049)


def test_rate_test_rejects_impossible_counts():
    with pytest.raises(ValueError, match="flagged"):
        rate_test(5, 0, alpha=0.01)
    with pytest.raises(ValueError, match="validation"):
        rate_test(5, 10, alpha=0.01, method="beta_binomial")


def test_monitor_config_is_validated_at_load(repo_params):
    parse_config({**repo_params, "monitor": {"alpha": 0.01, "test": "binomial"}})
    with pytest.raises(ConfigError, match=r"monitor\.alpha"):
        parse_config({**repo_params, "monitor": {"alpha": 0.7}})
    with pytest.raises(ConfigError, match="expected_ood_rate"):
        parse_config({**repo_params, "monitor": {"test": "beta_binomial", "expected_ood_rate": 0.05}})
    with pytest.raises(ConfigError, match=r"monitor\.test"):
        parse_config({**repo_params, "monitor": {"test": "chi2"}})


# ------------------------------------------------------------------ reading a batch
def _images(n: int, shape=(8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_npz_batches_in_every_layout_give_the_same_images(tmp_path):
    x = _images(5)
    layouts = {"nhw": x, "nhwc": x[..., None], "nchw": x[:, None]}
    digests = set()
    for name, a in layouts.items():
        np.savez(tmp_path / f"{name}.npz", x=a)
        b = load_batch(tmp_path / f"{name}.npz", SHAPE)
        assert b.x.shape == (5, 1, 8, 8) and b.x.dtype == np.float32
        np.testing.assert_allclose(b.x[:, 0], x / 255.0)
        digests.add(b.digest)
    np.savez(tmp_path / "float.npz", x=(x / 255.0).astype(np.float32))
    digests.add(load_batch(tmp_path / "float.npz", SHAPE).digest)
    assert len(digests) == 1  # the same pixels are the same batch, whatever the file's layout


def test_folder_batches_read_every_image_sorted_by_path(tmp_path):
    from PIL import Image

    x = _images(3)
    (tmp_path / "b" / "sub").mkdir(parents=True)
    for i, name in enumerate(["b/2.png", "b/10.jpg", "b/sub/1.bmp"]):
        Image.fromarray(x[i]).save(tmp_path / name, quality=100)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    b = load_batch(tmp_path / "b", SHAPE)
    assert b.names == ["10.jpg", "2.png", "sub/1.bmp"]
    np.testing.assert_allclose(b.x[1, 0], x[0] / 255.0)  # PNG is lossless


def test_rgb_folder_for_an_rgb_model_and_exif_orientation(tmp_path):
    from PIL import Image

    a = np.zeros((8, 4, 3), dtype=np.uint8)
    a[0, 0] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 8 high, 4 wide
    (tmp_path / "f").mkdir()
    img.save(tmp_path / "f" / "rotated.jpg", exif=exif, quality=100)
    b = load_batch(tmp_path / "f", (3, 4, 8))  # displayed 4 high, 8 wide
    assert b.x.shape == (1, 3, 4, 8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: np.savez(d / "b.npz", x=np.zeros((0, 8, 8), np.uint8)), "holds no images"),
        (lambda d: np.savez(d / "b.npz", y=_images(2)), "has no array 'x'"),
        (lambda d: np.savez(d / "b.npz", x=_images(2, (9, 9))), r"do not fit the model.*8x8 grayscale"),
        (lambda d: np.savez(d / "b.npz", x=_images(2, (8, 8, 3))), r"\(8, 8, 3\) do not fit"),
        (lambda d: np.savez(d / "b.npz", x=np.full((2, 8, 8), 2.0, np.float32)), r"must lie in \[0, 1\]"),
        (lambda d: np.savez(d / "b.npz", x=np.zeros((2, 8, 8), np.int64)), "uint8 or float"),
        (lambda d: (d / "b.npz").write_bytes(b"not a zip"), r"not a readable \.npz"),
    ],
)
def test_bad_npz_batches_say_what_is_wrong(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(BatchError, match=message):
        load_batch(tmp_path / "b.npz", SHAPE)


def _with(value: float, at: tuple[int, ...]) -> np.ndarray:
    x = np.full((4, 8, 8), 0.5, np.float32)
    x[at] = value
    return x


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (_with(np.nan, (2, 3, 3)), r"1 pixel values are NaN, in 1 of 4 images \(x\[2\]\)"),
        (
            _with(np.nan, (slice(1, 4), 0, 0)),
            r"3 pixel values are NaN, in 3 of 4 images \(x\[1\], x\[2\], x\[3\]\)",
        ),
        (_with(np.inf, (0, 0, 0)), r"1 pixel values are infinite, in 1 of 4 images \(x\[0\]\)"),
    ],
    ids=["one-nan", "nan-in-three", "inf"],
)
def test_nan_and_infinity_in_a_batch_are_named_as_such(tmp_path, x, message):
    """A NaN used to be reported as a range error ("must lie in [0, 1], got [0.5, 0.5]")."""
    np.savez(tmp_path / "b.npz", x=x)
    with pytest.raises(BatchError, match=message) as e:
        load_batch(tmp_path / "b.npz", SHAPE)
    assert "must lie in" not in str(e.value) and "\n" not in str(e.value)


def test_bad_folders_name_the_files(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="holds no images"):
        load_batch(tmp_path / "empty", SHAPE)
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(_images(1)[0]).save(d / "ok.png")
    Image.fromarray(_images(1, (8, 8, 3))[0]).save(d / "colour.png")
    Image.fromarray(_images(1, (16, 16))[0]).save(d / "big.png")
    with pytest.raises(BatchError, match=r"2 of 3 images are not 8x8 grayscale.*big.png \(16x16 grayscale\)"):
        load_batch(d, SHAPE)
    (d / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(BatchError, match=r"1 of 4 files cannot be read as images: broken.png"):
        load_batch(d, SHAPE)


def _header_only_npz(path, shape: tuple[int, ...]) -> None:
    """An .npz whose array 'x' is only a header claiming uint8 images of ``shape``: all a reader may
    look at before deciding to decompress (a real file of zeros is as small: 381 KB held 500,000)."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue())


def test_an_npz_batch_over_monitor_max_images_is_refused_from_its_header(tmp_path):
    """A 381 KB .npz of 500,000 zero images (392 MB decompressed) was read whole: 363 s, 4.6 GB."""
    np.savez_compressed(tmp_path / "b.npz", x=np.zeros((11, 8, 8), np.uint8))
    with pytest.raises(
        BatchError,
        match=r"^batch '.*b\.npz' \(its header: array 'x' uint8 of shape \(11, 8, 8\)\) holds 11 images, "
        r"more than monitor\.max_images=10; split the batch into smaller \.npz files, or raise the cap "
        r"with --set monitor\.max_images=N$",
    ):
        load_batch(tmp_path / "b.npz", SHAPE, max_images=10)
    assert len(load_batch(tmp_path / "b.npz", SHAPE, max_images=11).x) == 11
    # the header alone decides: one claiming a million images holds none, and is never decompressed
    _header_only_npz(tmp_path / "claims.npz", (1_000_000, 8, 8))
    with pytest.raises(BatchError, match=r"holds 1000000 images, more than monitor\.max_images=100000;"):
        load_batch(tmp_path / "claims.npz", SHAPE)  # the default cap, monitor.max_images' default
    # and so does the image shape: a (2, 100000, 100000) header is refused before 20 GB are read
    _header_only_npz(tmp_path / "wide.npz", (2, 100_000, 100_000))
    with pytest.raises(BatchError, match=r"images of shape \(100000, 100000\) do not fit the model"):
        load_batch(tmp_path / "wide.npz", SHAPE)
    # a folder is counted by its files, before any is decoded
    (tmp_path / "f").mkdir()
    for i in range(3):
        (tmp_path / "f" / f"{i}.png").write_bytes(b"not decoded")
    for fit in (False, True):
        with pytest.raises(BatchError, match=r"folder '.*f' holds 3 images, more than monitor\.max_images=2"):
            load_batch(tmp_path / "f", SHAPE, fit=fit, max_images=2)


def test_monitor_max_images_is_a_positive_count():
    from oodgate.base.config import MonitorConfig

    assert MonitorConfig().max_images == 100_000
    assert MonitorConfig(max_images=5).max_images == 5
    with pytest.raises(ConfigError, match=r"monitor\.max_images: .*greater than or equal to 1 \(got 0\)"):
        parse_config({"monitor": {"max_images": 0}})


@pytest.mark.parametrize("fit", [False, True], ids=["exact", "fitted"])
@pytest.mark.parametrize("side", [12, 16], ids=["pillow-warns", "pillow-raises"])
def test_an_image_over_pillows_pixel_limit_is_refused_naming_it(tmp_path, monkeypatch, fit, side):
    """A 20000x20000 PNG gave Pillow's DecompressionBombError without the file's name, in 165 lines
    with 3 tracebacks. Pillow only warns between its limit and twice it, and decodes the image."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # an 8x8 image (64 pixels) is within it
    d = tmp_path / "b"
    d.mkdir()
    Image.fromarray(_images(1)[0]).save(d / "ok.png")
    Image.fromarray(_images(1, (side, side))[0]).save(d / "big.png")
    with pytest.raises(
        BatchError,
        match=rf"^batch folder '.*b': big\.png has {side * side} pixels, over Pillow's limit of 100 pixels "
        r"\(PIL\.Image\.MAX_IMAGE_PIXELS, a guard against decompression bombs\); shrink it or remove it$",
    ):
        load_batch(d, SHAPE, fit=fit)
    (d / "big.png").unlink()
    assert len(load_batch(d, SHAPE, fit=fit).x) == 1  # Pillow's limit itself is kept


def test_a_missing_batch_says_so_and_a_dvc_tracked_one_says_to_pull_it(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        load_batch(tmp_path / "nowhere", SHAPE)
    (tmp_path / "incoming.dvc").write_text("outs:\n- md5: 0123.dir\n  path: incoming\n")
    with pytest.raises(BatchError, match=r"tracked by DVC \(incoming.dvc\).*dvc pull"):
        load_batch(tmp_path / "incoming", SHAPE)
    (tmp_path / "b.csv").write_text("1,2")
    with pytest.raises(BatchError, match=r"folder of images or an \.npz"):
        load_batch(tmp_path / "b.csv", SHAPE)


def test_a_summary_reads_back_from_the_record_it_writes():
    """``summary.json`` holds the figures, the test, the model and the batch in that order, and a
    batch scored before is reported from it as it was."""
    import json

    from oodgate.watching.monitoring import BatchFigures, MonitorResult, MonitorSummary

    figures = BatchFigures(600, 31, 31 / 600, 0.93, float("nan"), 2.5, {"0": 300, "1": 300})
    summary = MonitorSummary(figures, rate_test(31, 600, 0.01), "m", 2, "champion", "/b.npz", "ab" * 32)
    record = summary.record()
    assert list(record)[:8] == ["n", "flagged", "ood_rate", "mean_confidence", "mean_confidence_accepted",
                                "mean_score", "class_counts", "test"]  # fmt: skip
    again = MonitorSummary.from_record(json.loads(json.dumps(record, indent=1)))
    assert json.dumps(again.record()) == json.dumps(record)
    fresh = MonitorResult(summary, "/p.parquet", "run", reused=False, step=3).record()
    assert list(fresh)[-4:] == ["predictions", "mlflow_run_id", "step", "reused"]
    assert "step" not in MonitorResult(again, "/p.parquet", "run", reused=True).record()
    assert summary.report().startswith("## Monitoring: no alert\n\n- batch: `/b.npz` (600 images)")
