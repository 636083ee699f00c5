"""Tests of ``oodgate.data``: embedded data, splits, OOD sets and the torchvision loaders (tiny fixtures)."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodgate.base.config import DataConfig
from oodgate.data.bundle import DataBundle, DataNotFoundError, ImageSet
from oodgate.data.embedded import materialize_embedded
from oodgate.data.id_sets import ID_DATASETS
from oodgate.data.images import conform
from oodgate.data.load import channel_stats, load_data
from oodgate.data.ood import OOD_DATASETS, load_path_source

EMBEDDED_SHA256 = {
    "mnist5k_images.npy": "fd5da3944b2079e9584591a5faa956b0bc57fb8788eba1b5693d907da357a53c",
    "mnist5k_labels.npy": "8d6ffbd471f68554596db3fd97468e00ec7598123ae40ccdd050c57fa2036e11",
    "photo_patches.npy": "bc4eb4d9ebe74d748f7e0e3bf45e4c6b62d874929fafb6591e533fc06558e293",
    # the validation OOD sets, rendered from matplotlib's fonts and photograph: the same bytes on
    # every machine (Pillow's rasteriser and resampling are integer or fixed-point)
    "glyphs.npy": "526b8fadf7da8410a31da0b98a42e815a7d61788aefebdb2199c17c9bb1a3180",
    "portrait_patches.npy": "268400ea8684f6f750790154317a9f902904296b665c6b144d84c8bc2cadddcc",
}
ID_DIGITS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the embedded data materialised once for the module."""
    r = tmp_path_factory.mktemp("data")
    materialize_embedded(r)
    return r


@pytest.fixture(scope="module")
def mnist5k(root: Path) -> tuple[np.ndarray, np.ndarray]:
    e = root / "embedded"
    return np.load(e / "mnist5k_images.npy"), np.load(e / "mnist5k_labels.npy")


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), **kw)


def row_keys(x: torch.Tensor) -> set[bytes]:
    return {bytes(img) for img in x.reshape(x.shape[0], -1).numpy()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- embedded data -----------------------------------------------------------------------------------


def test_materialize_writes_fixed_bytes_and_is_idempotent(root: Path) -> None:
    folder = root / "embedded"
    assert {p.name: sha256(p) for p in folder.iterdir()} == EMBEDDED_SHA256
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    written = materialize_embedded(root)
    assert written == [folder / name for name in EMBEDDED_SHA256]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_embedded_shapes_dtypes_and_label_counts(root: Path, mnist5k: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist5k
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    patches = np.load(root / "embedded" / "photo_patches.npy")
    assert patches.shape == (1000, 28, 28) and patches.dtype == np.uint8
    assert patches.std() > 20  # real image content, not a constant


def test_missing_embedded_data_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(
        DataNotFoundError, match=r"embedded data not found at .*python -m oodgate materialize"
    ):
        load_data(cfg(tmp_path))


# --- splits ------------------------------------------------------------------------------------------


def test_splits_are_disjoint_with_configured_sizes(
    root: Path, mnist5k: tuple[np.ndarray, np.ndarray]
) -> None:
    b = load_data(cfg(root, classes=ID_DIGITS, val_fraction=0.1, test_fraction=0.2))
    assert isinstance(b, DataBundle)
    # 500 per digit: test = 100 per class, val = 10% of the remaining 400 per class.
    assert (len(b.train), len(b.val), len(b.test)) == (6 * 360, 6 * 40, 6 * 100)
    for s in (b.train, b.val, b.test):
        assert s.x.dtype == torch.uint8 and s.x.shape[1:] == (1, 28, 28) and s.x.is_contiguous()
        assert s.y.dtype == torch.int64
        assert torch.bincount(s.y).tolist() == [len(s) // 6] * 6
    train, val, test = row_keys(b.train.x), row_keys(b.val.x), row_keys(b.test.x)
    assert not (train & val) and not (train & test) and not (val & test)
    images, labels = mnist5k
    kept = images[np.isin(labels, ID_DIGITS)]
    assert train | val | test == row_keys(torch.from_numpy(kept))
    assert (b.num_classes, b.in_channels, b.image_size) == (6, 1, 28)
    assert b.class_names == ["0", "1", "2", "3", "4", "5"]


def test_splits_are_deterministic_and_follow_split_seed(root: Path) -> None:
    a = load_data(cfg(root, classes=ID_DIGITS))
    b = load_data(cfg(root, classes=ID_DIGITS))
    c = load_data(cfg(root, classes=ID_DIGITS, split_seed=1))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
        assert not torch.equal(getattr(a, name).x, getattr(c, name).x)
    assert a.mean == b.mean and a.std == b.std


def test_class_selection_remaps_labels_in_listed_order(
    root: Path, mnist5k: tuple[np.ndarray, np.ndarray]
) -> None:
    b = load_data(cfg(root, classes=[7, 3]))
    assert b.class_names == ["7", "3"] and b.num_classes == 2
    images, labels = mnist5k
    sevens, threes = (
        row_keys(torch.from_numpy(images[labels == 7])),
        row_keys(torch.from_numpy(images[labels == 3])),
    )
    for s in (b.train, b.val, b.test):
        assert row_keys(s.x[s.y == 0]) <= sevens
        assert row_keys(s.x[s.y == 1]) <= threes
    assert len(b.train) + len(b.val) + len(b.test) == 1000


def test_all_classes_when_classes_is_null(root: Path) -> None:
    b = load_data(cfg(root))
    assert b.num_classes == 10 and len(b.train) + len(b.val) + len(b.test) == 5000


def test_bad_class_index_names_the_key_value_and_range(root: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.classes: class index 12 .*'embedded_mnist'.*0\.\.9"):
        load_data(cfg(root, classes=[0, 12]))


def test_channel_stats_match_float64_reference(root: Path) -> None:
    b = load_data(cfg(root, classes=ID_DIGITS))
    ref = b.train.x.numpy().astype(np.float64) / 255
    assert b.mean == (round(float(ref.mean()), 6),)
    assert b.std == (round(float(ref.std()), 6),)
    rgb = torch.tensor([[[[0, 255]], [[10, 10]], [[0, 0]]]], dtype=torch.uint8)  # 1 image, 3 channels, 1x2
    assert channel_stats(rgb.numpy()) == ((0.5, round(10 / 255, 6), 0.0), (0.5, 0.0, 0.0))


# --- OOD sets ----------------------------------------------------------------------------------------

ALL_BUILTIN_OOD = ["mnist_unseen", "photo_patches", "gaussian_noise", "uniform_noise"]


def test_ood_sets_keep_config_order_are_whole_and_grouped(root: Path) -> None:
    b = load_data(cfg(root, classes=ID_DIGITS, ood=ALL_BUILTIN_OOD))
    assert list(b.ood) == ALL_BUILTIN_OOD
    sizes = {"mnist_unseen": 2000, "photo_patches": 1000, "gaussian_noise": 1000, "uniform_noise": 1000}
    for name in ALL_BUILTIN_OOD:
        s = b.ood[name]
        assert len(s) == sizes[name]  # every image is a test image: nothing is tuned on OOD data
        assert s.x.shape[1:] == (1, 28, 28) and s.x.dtype == torch.uint8
        assert torch.all(s.y == -1)
    assert b.ood_groups == {
        "mnist_unseen": "near",
        "photo_patches": "far",
        "gaussian_noise": "far",
        "uniform_noise": "far",
    }


def test_mnist_unseen_holds_only_the_unseen_digits(
    root: Path, mnist5k: tuple[np.ndarray, np.ndarray]
) -> None:
    b = load_data(cfg(root, classes=ID_DIGITS, ood=["mnist_unseen"]))
    images, labels = mnist5k
    unseen = row_keys(torch.from_numpy(images[labels >= 6]))
    got = row_keys(b.ood["mnist_unseen"].x)
    assert got == unseen


def test_noise_is_at_the_id_shape_and_deterministic(root: Path) -> None:
    noise = ["gaussian_noise", "uniform_noise"]
    a = load_data(cfg(root, classes=ID_DIGITS, ood=noise, ood_size=40))
    b = load_data(cfg(root, classes=ID_DIGITS, ood=noise, ood_size=40))
    c = load_data(cfg(root, classes=ID_DIGITS, ood=noise, ood_size=40, split_seed=3))
    for name in noise:
        assert a.ood[name].x.shape == (40, 1, 28, 28)
        assert torch.equal(a.ood[name].x, b.ood[name].x)
        assert not torch.equal(a.ood[name].x, c.ood[name].x)
    g = a.ood["gaussian_noise"].x.double()
    assert abs(g.mean().item() - 127.5) < 3 and abs(g.std().item() - 0.25 * 255) < 4
    assert not torch.equal(a.ood["gaussian_noise"].x, a.ood["uniform_noise"].x)


def test_photo_patches_subset_to_ood_size(root: Path) -> None:
    b = load_data(cfg(root, classes=ID_DIGITS, ood=["photo_patches"], ood_size=100))
    assert len(b.ood["photo_patches"]) == 100


def _write_image_folder(folder: Path) -> None:
    folder.mkdir()
    Image.fromarray(np.full((28, 28, 3), (255, 0, 0), dtype=np.uint8)).save(folder / "a.png")  # red, RGB
    Image.fromarray(np.full((56, 40), 200, dtype=np.uint8)).save(folder / "b.bmp")  # gray, other size
    Image.fromarray(np.full((10, 10, 3), 9, dtype=np.uint8)).save(folder / "c.PNG")
    (folder / "notes.txt").write_text("not an image")


def test_folder_source_is_sorted_and_conformed(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "imgs")
    x = load_path_source(tmp_path / "imgs", 1, 28)
    assert x.shape == (3, 1, 28, 28)
    # Constant images stay constant through resizing; red -> (299 * 255 + 500) // 1000 = 76.
    assert [int(v) for v in x.amax(dim=(1, 2, 3))] == [76, 200, 9]
    assert [int(v) for v in x.amin(dim=(1, 2, 3))] == [76, 200, 9]
    rgb = load_path_source(tmp_path / "imgs", 3, 32)
    assert rgb.shape == (3, 3, 32, 32)
    assert rgb[0, :, 5, 5].tolist() == [255, 0, 0] and rgb[1, :, 5, 5].tolist() == [200, 200, 200]


def test_folder_and_npz_sources_in_load_data(root: Path, tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "imgs")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "gray.npz", x=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    ood = [
        {"name": "folder", "path": str(tmp_path / "imgs"), "group": "far"},
        {"name": "rgb", "path": str(tmp_path / "rgb.npz"), "group": "far"},
        {"name": "gray", "path": str(tmp_path / "gray.npz"), "group": "near"},
    ]
    b = load_data(cfg(root, classes=ID_DIGITS, ood=ood))
    assert list(b.ood) == ["folder", "rgb", "gray"]
    assert [len(b.ood[k]) for k in b.ood] == [3, 6, 4]
    assert b.ood_groups == {"folder": "far", "rgb": "far", "gray": "near"}
    assert all(s.x.shape[1:] == (1, 28, 28) for s in b.ood.values())
    gray_in = np.load(tmp_path / "gray.npz")["x"]
    got = row_keys(b.ood["gray"].x)
    assert got == row_keys(torch.from_numpy(gray_in))  # already at the ID shape: unchanged


def test_path_source_errors_name_the_path(root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_data(cfg(root, classes=ID_DIGITS, ood=[{"name": "x", "path": str(tmp_path / "missing")}]))
    with pytest.raises(ValueError, match=r"empty.*holds no images"):
        load_data(cfg(root, classes=ID_DIGITS, ood=[{"name": "x", "path": str(tmp_path / "empty")}]))
    with pytest.raises(ValueError, match=r"bad\.npz.*no array 'x'.*images"):
        load_data(cfg(root, classes=ID_DIGITS, ood=[{"name": "x", "path": str(tmp_path / "bad.npz")}]))


@pytest.mark.parametrize("side", [12, 16], ids=["pillow-warns", "pillow-raises"])
def test_an_ood_folder_image_over_pillows_pixel_limit_is_named(tmp_path: Path, monkeypatch, side) -> None:
    """Over twice Pillow's limit its DecompressionBombError had no file name; between the limit and
    twice it Pillow only warned and decoded the image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # an 8x8 image (64 pixels) is within it
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "imgs" / "big.png")
    with pytest.raises(
        ValueError,
        match=rf"^OOD folder '.*imgs': big\.png has {side * side} pixels, over Pillow's limit of 100 pixels "
        r"\(PIL\.Image\.MAX_IMAGE_PIXELS, a guard against decompression bombs\); shrink it or remove it$",
    ):
        load_path_source(tmp_path / "imgs", 1, 28)
    (tmp_path / "imgs" / "big.png").unlink()
    assert load_path_source(tmp_path / "imgs", 1, 28).shape == (1, 1, 28, 28)


def test_ood_config_errors(root: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown OOD dataset 'tiny_imagenet'.*gaussian_noise.*photo_patches"
    ):
        load_data(cfg(root, classes=ID_DIGITS, ood=["tiny_imagenet"]))
    with pytest.raises(ValueError, match="listed twice"):
        load_data(cfg(root, classes=ID_DIGITS, ood=["gaussian_noise", "gaussian_noise"]))
    with pytest.raises(ValueError, match=r"mnist_unseen.*keeps every digit"):
        load_data(cfg(root, ood=["mnist_unseen"]))
    with pytest.raises(ValueError, match=r"mnist_unseen.*needs data\.dataset: embedded_mnist"):
        load_data(cfg(root, dataset="cifar10", ood=["mnist_unseen"]))
    with pytest.raises(ValueError, match="in-distribution dataset"):
        load_data(cfg(root, dataset="mnist", ood=["mnist"]))


def test_registries_list_the_documented_names() -> None:
    tv = ["cifar10", "cifar100", "fashion_mnist", "mnist", "svhn"]
    assert ID_DATASETS.names() == sorted(["embedded_mnist", *tv])
    assert OOD_DATASETS.names() == sorted([*ALL_BUILTIN_OOD, "glyphs", "portrait_patches", *tv])
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*embedded_mnist"):
        load_data(DataConfig(dataset="imagenet"))


# --- conform -----------------------------------------------------------------------------------------


def test_conform_gray_to_rgb_and_resize() -> None:
    gray = torch.arange(4 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(4, 1, 28, 28)
    rgb = conform(gray, 3, 28)
    assert rgb.shape == (4, 3, 28, 28) and rgb.is_contiguous()
    assert all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    up = conform(gray, 3, 32)
    assert up.shape == (4, 3, 32, 32) and up.dtype == torch.uint8
    assert torch.equal(up, conform(gray, 3, 32))
    const = torch.full((2, 1, 50, 30), 123, dtype=torch.uint8)
    assert torch.all(conform(const, 1, 28) == 123)


def test_conform_rgb_to_gray_and_downsample_reference() -> None:
    rgb = torch.tensor([255, 255, 0, 10], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    rgb[0, :, 0, 0] = torch.tensor([255, 0, 0])  # red
    rgb[0, :, 0, 1] = torch.tensor([0, 255, 0])  # green
    gray = conform(rgb, 1, 2)
    # (299 R + 587 G + 114 B + 500) // 1000
    assert gray.flatten().tolist() == [76, 150, 0, 10]
    # 2x2 -> 1x1 with antialiasing is the mean of the four pixels, rounded: (76 + 150 + 0 + 10) / 4 = 59.
    assert conform(rgb, 1, 1).flatten().tolist() == [59]
    with pytest.raises(ValueError, match="uint8"):
        conform(rgb.float(), 1, 2)


def test_imageset_validates_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --- torchvision loaders on tiny files in their on-disk formats --------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """uint8 (n, 3, 32, 32), each image distinct (its first pixel is its index + offset)."""
    x = np.random.default_rng(offset).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(offset, offset + n, dtype=np.uint8)
    return x


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ with 5 training batches of 10 images (labels 0..9) and a test batch of 20."""
    import torchvision.datasets.cifar

    # The tiny files cannot match CIFAR's published md5 sums; only the integrity check is bypassed,
    # the files are still read by torchvision's own code.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = _cifar_images(50, 0)
    for i in range(5):
        batch = train[i * 10 : (i + 1) * 10]
        _pickle(folder / f"data_batch_{i + 1}", {"data": batch.reshape(10, -1), "labels": list(range(10))})
    test = _cifar_images(20, 100)
    _pickle(folder / "test_batch", {"data": test.reshape(20, -1), "labels": [i % 10 for i in range(20)]})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES})
    return tmp_path, train, test


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (idx-ubyte) file: magic 0x0000 08 <ndim>, big-endian dims, then uint8 data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist_raw(root: Path, folder: str, n_train: int = 40, n_test: int = 20) -> tuple[np.ndarray, ...]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    xtr, xte = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (n_train, n_test))
    ytr, yte = np.arange(n_train) % 10, np.arange(n_test) % 10
    _write_idx(raw / "train-images-idx3-ubyte", xtr)
    _write_idx(raw / "train-labels-idx1-ubyte", ytr)
    _write_idx(raw / "t10k-images-idx3-ubyte", xte)
    _write_idx(raw / "t10k-labels-idx1-ubyte", yte)
    return xtr, ytr, xte, yte


def test_cifar10_loader_reads_official_splits(cifar10_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    r, train, test = cifar10_root
    b = load_data(DataConfig(dataset="cifar10", root=str(r), val_fraction=0.2))
    assert (len(b.train), len(b.val), len(b.test)) == (40, 10, 20)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    assert b.class_names == CIFAR10_NAMES
    assert torch.equal(b.test.x, torch.from_numpy(test))  # official test split, order kept
    assert b.test.y.tolist() == [i % 10 for i in range(20)]
    assert row_keys(b.train.x) | row_keys(b.val.x) == row_keys(torch.from_numpy(train))
    assert not row_keys(b.train.x) & row_keys(b.val.x)
    assert len(b.mean) == len(b.std) == 3


def test_cifar10_class_selection_and_mnist_as_ood(cifar10_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    r, _, test = cifar10_root
    _write_mnist_raw(r, "MNIST")
    b = load_data(DataConfig(dataset="cifar10", root=str(r), classes=[5, 3], val_fraction=0.2, ood=["mnist"]))
    assert b.class_names == ["dog", "cat"]
    assert torch.equal(b.test.x, torch.from_numpy(test[[3, 5, 13, 15]]))
    assert b.test.y.tolist() == [1, 0, 1, 0]
    assert len(b.ood["mnist"]) == 20 and b.ood_groups == {"mnist": "far"}  # another kind of image
    ood = b.ood["mnist"].x
    assert ood.shape == (20, 3, 32, 32) and torch.equal(ood[:, 0], ood[:, 2])  # gray -> RGB, resized


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_loaders(tmp_path: Path, dataset: str, folder: str) -> None:
    xtr, _, xte, yte = _write_mnist_raw(tmp_path, folder)
    b = load_data(DataConfig(dataset=dataset, root=str(tmp_path), val_fraction=0.25))
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20)
    assert torch.equal(b.test.x, torch.from_numpy(xte).unsqueeze(1))
    assert b.test.y.tolist() == yte.tolist()
    assert row_keys(b.train.x) | row_keys(b.val.x) == row_keys(torch.from_numpy(xtr))
    if dataset == "mnist":
        assert b.class_names == [str(d) for d in range(10)]
    else:
        assert b.class_names[0] == "T-shirt/top"


def test_svhn_loader_maps_label_10_to_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.io
    import torchvision.datasets

    # The tiny .mat files cannot match SVHN's md5 sums; only the integrity check is bypassed.
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    rng = np.random.default_rng(3)
    for split, n in (("train", 20), ("test", 10)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN stores H, W, C, N
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # digits 1..10, 10 means 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "test":
            x_test, y_test = x, y
    b = load_data(DataConfig(dataset="svhn", root=str(tmp_path), val_fraction=0.3))
    assert (len(b.train), len(b.val), len(b.test)) == (10, 10, 10)
    assert torch.equal(b.test.x, torch.from_numpy(np.ascontiguousarray(x_test.transpose(3, 2, 0, 1))))
    assert b.test.y.tolist() == (y_test.ravel() % 10).tolist()
    assert b.class_names == [str(d) for d in range(10)]


def test_cifar100_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar

    # Tiny files cannot match the published md5 sums; only the integrity check is bypassed.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i}" for i in range(100)]
    _pickle(
        folder / "train",
        {"data": _cifar_images(200, 0).reshape(200, -1), "fine_labels": list(range(100)) * 2},
    )
    _pickle(
        folder / "test", {"data": _cifar_images(100, 0).reshape(100, -1), "fine_labels": list(range(100))}
    )
    _pickle(folder / "meta", {"fine_label_names": names})
    b = load_data(DataConfig(dataset="cifar100", root=str(tmp_path), classes=[10, 20, 30], val_fraction=0.4))
    assert b.class_names == ["class10", "class20", "class30"]
    assert (len(b.train), len(b.val), len(b.test)) == (3, 3, 3)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
    ],
)
def test_missing_torchvision_dataset_says_where_and_how(tmp_path: Path, dataset: str, expected: str) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_data(DataConfig(dataset=dataset, root=str(tmp_path)))
    msg = str(err.value)
    assert repr(dataset) in msg and expected in msg and str(tmp_path) in msg
    assert "data.download: true" in msg and "dvc add data" in msg


def test_missing_torchvision_ood_set(root: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"'cifar10'.*cifar-10-batches-py"):
        load_data(cfg(root, classes=ID_DIGITS, ood=["cifar10"]))
