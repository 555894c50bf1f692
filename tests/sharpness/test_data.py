"""Every data spec on small files made here; the digits split; shards; the restricted unpickler."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from sharpness.data import Dataset, digits_split, load_dataset, num_features, shards
from sharpness.datafiles import CIFAR_MEAN, CIFAR_STD, ArrayUnpickler, read_idx
from sharpness.functional import SharpnessInputError


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(SharpnessInputError, match=match) as exc:
        fn(*args, **kwargs)
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_split_is_stratified_disjoint_and_covers_everything():
    train_idx, test_idx = digits_split()
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, test_idx), np.arange(1797))
    all_y = load_dataset("digits", split="all").y.numpy()
    per_class = np.bincount(all_y, minlength=10)
    test_per_class = np.bincount(all_y[test_idx], minlength=10)
    assert np.array_equal(test_per_class, np.round(0.2 * per_class).astype(int))
    assert len(load_dataset("digits", split="test")) == test_idx.size == test_per_class.sum()
    assert len(load_dataset("digits", split="train")) == train_idx.size


def test_digits_content_and_determinism():
    raw = np.load(os.path.join(os.path.dirname(__import__("sharpness").__file__), "digits.npz"))
    full = load_dataset("digits", split="all")
    assert full.x.shape == (1797, 1, 8, 8) and full.x.dtype == torch.float32 and full.y.dtype == torch.int64
    np.testing.assert_array_equal(full.x.numpy()[:, 0] * 16, raw["x"].astype(np.float32))
    np.testing.assert_array_equal(full.y.numpy(), raw["y"])
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=123)  # the seed never moves the test set
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    test_idx = digits_split()[1]
    assert torch.equal(a.x, full.x[torch.from_numpy(test_idx)])
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8) and num_features(a) == 64


def test_samples_takes_a_seeded_subset():
    d1 = load_dataset("digits", split="train", samples=100, seed=1)
    d2 = load_dataset("digits", split="train", samples=100, seed=1)
    d3 = load_dataset("digits", split="train", samples=100, seed=2)
    assert len(d1) == 100 and torch.equal(d1.x, d2.x) and not torch.equal(d1.x, d3.x)
    assert d1.meta["subset"] == {"requested": 100, "taken": 100, "seed": 1}
    assert len(load_dataset("digits", samples=10_000)) == len(load_dataset("digits"))
    one_line_error("samples must be >= 1", load_dataset, "digits", samples=0)


def test_dataset_methods():
    d = load_dataset("digits", split="test")
    batches = d.batches(100)
    assert [len(b[0]) for b in batches] == [100, 100, 100, len(d) - 300]
    assert torch.equal(torch.cat([b[1] for b in batches]), d.y)
    assert len(d.batches()) == 1
    d64 = d.to("cpu", torch.float64)
    assert d64.x.dtype == torch.float64 and d64.y.dtype == torch.int64 and d.x.dtype == torch.float32
    reg = Dataset(torch.zeros(4, 2), torch.zeros(4), None, "reg")
    assert reg.to(dtype=torch.float64).y.dtype == torch.float64
    one_line_error("batch size", d.batches, 0)
    with pytest.raises(SharpnessInputError, match="3 inputs but 2 targets"):
        Dataset(torch.zeros(3, 2), torch.zeros(2), None, "bad")


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_parsed():
    a = load_dataset("synthetic:500", split="all")
    assert a.x.shape == (500, 20) and a.num_classes == 10 and int(a.y.max()) < 10
    assert torch.equal(a.x, load_dataset("synthetic:500", split="all").x)
    assert not torch.equal(a.x, load_dataset("synthetic:500:seed=1", split="all").x)
    assert len(load_dataset("synthetic:500", split="train")) + len(load_dataset("synthetic:500")) == 500
    b = load_dataset("synthetic:300:d=5:classes=3", split="all")
    assert b.x.shape == (300, 5) and b.num_classes == 3
    assert set(b.y.tolist()) == {0, 1, 2} and b.y.bincount().min() > 30  # balanced enough to learn
    one_line_error("unknown option", load_dataset, "synthetic:10:depth=3")
    one_line_error("needs a number", load_dataset, "synthetic:10:d=x")
    one_line_error("synthetic:N", load_dataset, "synthetic:many")


# ----------------------------------------------------------------------------------------- .pt and .npz


@pytest.mark.parametrize("keys", [("x", "y"), ("inputs", "targets"), ("data", "labels")])
def test_pt_and_npz_files(tmp_path, keys):
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float64)
    y = np.array([0, 1, 2, 1, 0, 4, 1])
    np.savez(tmp_path / "d.npz", **{keys[0]: x, keys[1]: y})
    torch.save({keys[0]: torch.from_numpy(x), keys[1]: torch.from_numpy(y)}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        d = load_dataset(str(tmp_path / name))
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64 and d.num_classes == 5
        np.testing.assert_allclose(d.x.numpy(), x.astype(np.float32))


def test_pt_tuple_and_regression_targets(tmp_path):
    x, y = torch.randn(5, 2), torch.randn(5)
    torch.save((x, y), tmp_path / "t.pt")
    d = load_dataset(str(tmp_path / "t.pt"))
    assert d.num_classes is None and d.y.dtype == torch.float32 and torch.equal(d.y, y)


def test_array_file_errors(tmp_path):
    one_line_error("not found", load_dataset, str(tmp_path / "none.npz"))
    np.savez(tmp_path / "k.npz", a=np.zeros(3), b=np.zeros(3))
    one_line_error("expected x/y", load_dataset, str(tmp_path / "k.npz"))
    np.savez(tmp_path / "n.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    one_line_error("3 inputs but 4 targets", load_dataset, str(tmp_path / "n.npz"))
    (tmp_path / "bad.pt").write_bytes(b"garbage bytes")
    one_line_error("malformed", load_dataset, str(tmp_path / "bad.pt"))
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 2)), y=np.array([-1, 0]))
    one_line_error("labels must be >= 0", load_dataset, str(tmp_path / "neg.npz"))
    (tmp_path / "d.csv").write_text("1,2\n")
    one_line_error("unsupported type", load_dataset, str(tmp_path / "d.csv"))
    one_line_error("unknown data spec", load_dataset, "imagenet")
    one_line_error("split must be", load_dataset, "digits", split="val")


# ---------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(root, sizes, protocol=2):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name, n in sizes.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"a.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (data, labels)
    return out


def test_cifar10_batches(tmp_path):
    names = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    made = write_cifar(tmp_path, names)
    test = load_dataset(f"cifar10:{tmp_path}")
    assert test.x.shape == (4, 3, 32, 32) and test.num_classes == 10
    data, labels = made["test_batch"]
    pixels = torch.from_numpy(data.reshape(4, 3, 32, 32).astype(np.float32)) / 255
    expect = (pixels - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(test.x, expect)
    assert test.y.tolist() == labels
    train = load_dataset(f"cifar10:{tmp_path}", split="train")
    assert len(train) == 15 and train.y.tolist() == sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(load_dataset(f"cifar10:{tmp_path}", split="all", samples=7)) == 7


def test_cifar10_any_python3_protocol(tmp_path):
    write_cifar(tmp_path, {"test_batch": 2}, protocol=4)
    assert len(load_dataset(f"cifar10:{tmp_path}")) == 2


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """What Python 2's cPickle wrote for the real batches: str opcodes and numpy.core.multiarray globals."""
    rows, cols = data.shape
    raw = data.astype(np.uint8).tobytes()
    return b"".join(
        [
            b"\x80\x02}q\x00(U\x04data",
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R",
            b"(K\x01M" + rows.to_bytes(2, "little") + b"M" + cols.to_bytes(2, "little") + b"\x86",
            b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
            b"\x89T" + len(raw).to_bytes(4, "little") + raw + b"tb",
            b"U\x06labels](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu.",
        ]
    )


def test_cifar10_python2_pickle(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(py2_pickle(data, [3, 9]))
    d = load_dataset(f"cifar10:{tmp_path}")
    assert d.y.tolist() == [3, 9]
    pixels = torch.from_numpy(data.reshape(2, 3, 32, 32).astype(np.float32)) / 255
    torch.testing.assert_close(d.x[:, 1] * CIFAR_STD[1] + CIFAR_MEAN[1], pixels[:, 1])


def test_cifar10_errors(tmp_path):
    one_line_error("data folder not found", load_dataset, f"cifar10:{tmp_path / 'none'}")
    write_cifar(tmp_path, {"data_batch_1": 2, "data_batch_2": 2, "test_batch": 2})
    msg = one_line_error("missing batch file", load_dataset, f"cifar10:{tmp_path}", split="train")
    assert "data_batch_3, data_batch_4, data_batch_5" in msg
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 5))}))
    one_line_error("not a CIFAR batch", load_dataset, f"cifar10:{tmp_path}")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_malicious_globals(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    payload = pickle.dumps({b"data": Evil(), b"labels": [0]})
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    msg = one_line_error("refusing to load global", load_dataset, f"cifar10:{tmp_path}")
    assert "system" in msg
    import io

    for evil in (Evil(), torch.nn.Linear(1, 1), np.float64(1.0)):
        with pytest.raises(pickle.UnpicklingError):
            ArrayUnpickler(io.BytesIO(pickle.dumps(evil))).load()
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    for protocol in (2, 4):
        back = ArrayUnpickler(io.BytesIO(pickle.dumps({"a": arr, "b": [b"x"]}, protocol=protocol))).load()
        assert np.array_equal(back["a"], arr) and back["b"] == [b"x"]


# ----------------------------------------------------------------------------------------- Fashion-MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder, gz: bool):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    made = {}
    for split, n in (("train", 5), ("t10k", 3)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n).astype(np.uint8)
        for kind, arr, nd in (("images", img, 3), ("labels", lab, 1)):
            name = f"{split}-{kind}-idx{nd}-ubyte" + (".gz" if gz else "")
            raw = idx_bytes(arr)
            (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
        made[split] = (img, lab)
    return made


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_found_recursively(tmp_path, gz):
    made = write_idx(tmp_path / "usr" / "share" / "fashion-mnist", gz)
    test = load_dataset(f"fashion-mnist:{tmp_path}")
    assert test.x.shape == (3, 1, 28, 28) and test.num_classes == 10
    np.testing.assert_allclose(test.x.numpy()[:, 0], made["t10k"][0] / 255.0, rtol=1e-6)
    assert test.y.tolist() == made["t10k"][1].tolist()
    assert len(load_dataset(f"fashion-mnist:{tmp_path}", split="train")) == 5
    assert len(load_dataset(f"fashion-mnist:{tmp_path}", split="all")) == 8


def test_idx_errors(tmp_path):
    one_line_error("data folder not found", load_dataset, f"fashion-mnist:{tmp_path / 'none'}")
    write_idx(tmp_path / "f", gz=False)
    os.remove(tmp_path / "f" / "t10k-labels-idx1-ubyte")
    one_line_error("missing idx file.*t10k-labels", load_dataset, f"fashion-mnist:{tmp_path}")
    raw = (tmp_path / "f" / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:100])
    one_line_error("truncated", read_idx, tmp_path / "cut")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    one_line_error("bad magic", read_idx, tmp_path / "magic")
    (tmp_path / "f" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2)))
    one_line_error("images have shape", load_dataset, f"fashion-mnist:{tmp_path}")


def test_fashion_mnist_default_folder(tmp_path, monkeypatch):
    """``fashion-mnist`` alone reads the Debian package's folder; a missing one names the install command."""
    import sharpness.data as data

    made = write_idx(tmp_path / "pkg", gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "pkg"))
    test = load_dataset("fashion-mnist")
    assert (
        test.y.tolist() == made["t10k"][1].tolist() and len(load_dataset("fashion-mnist", split="train")) == 5
    )
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    msg = one_line_error("data folder not found", load_dataset, "fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in msg and "dpkg -x" in msg
    msg = one_line_error("data folder not found", load_dataset, f"fashion-mnist:{tmp_path / 'none'}")
    assert "apt-get" in msg


# ------------------------------------------------------------------------------------------- MODULE:CALLABLE

LOADER_SRC = textwrap.dedent(
    """
    import torch
    from sharpness.data import Dataset

    def pair(split="test"):
        n = 4 if split == "test" else 6
        return torch.arange(2 * n, dtype=torch.float64).reshape(n, 2), torch.arange(n) % 3

    def batches():
        return [(torch.ones(2, 3), torch.tensor([0, 1])), (torch.zeros(1, 3), torch.tensor([2]))]

    def dataset(split):
        return Dataset(torch.zeros(3, 1), torch.zeros(3, dtype=torch.int64), 2, "mine", {"split": split})

    def broken(split):
        raise RuntimeError("disk on fire")

    def nonsense(split):
        return 42
    """
)


@pytest.fixture()
def loader_module(tmp_path, monkeypatch):
    (tmp_path / "data_test_loader.py").write_text(LOADER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "data_test_loader"
    sys.modules.pop("data_test_loader", None)


def test_module_callable_specs(loader_module):
    d = load_dataset(f"{loader_module}:pair", split="train")
    assert d.x.shape == (6, 2) and d.x.dtype == torch.float32 and d.num_classes == 3
    assert len(load_dataset(f"{loader_module}:pair")) == 4
    b = load_dataset(f"{loader_module}:batches")
    assert b.x.shape == (3, 3) and b.y.tolist() == [0, 1, 2]
    own = load_dataset(f"{loader_module}:dataset", split="all", samples=2)
    assert own.name == "mine" and own.meta["split"] == "all" and len(own) == 2
    one_line_error("disk on fire", load_dataset, f"{loader_module}:broken")
    one_line_error("not data", load_dataset, f"{loader_module}:nonsense")
    one_line_error("has no attribute", load_dataset, f"{loader_module}:missing")
    one_line_error("cannot import", load_dataset, "no_such_data_pkg_q:load")


# ------------------------------------------------------------------------------------------------ shards


def label_skew(ds, parts) -> float:
    """Mean total-variation distance between each shard's label histogram and the whole set's."""
    whole = np.bincount(ds.y.numpy(), minlength=10) / len(ds)
    tv = [0.5 * np.abs(np.bincount(ds.y[p].numpy(), minlength=10) / len(p) - whole).sum() for p in parts]
    return float(np.mean(tv))


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0])
def test_shards_are_disjoint_equal_and_seeded(alpha):
    ds = load_dataset("digits", split="train")
    parts = shards(ds, 16, seed=3, alpha=alpha)
    n = len(ds) // 16
    assert len(parts) == 16 and all(len(p) == n and p.dtype == torch.int64 for p in parts)
    flat = torch.cat(parts)
    assert flat.unique().numel() == flat.numel() == 16 * n and int(flat.max()) < len(ds)
    again = shards(ds, 16, seed=3, alpha=alpha)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = shards(ds, 16, seed=4, alpha=alpha)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_differs_from_iid():
    ds = load_dataset("digits", split="train")
    iid = label_skew(ds, shards(ds, 16, seed=0))
    skewed = label_skew(ds, shards(ds, 16, seed=0, alpha=0.1))
    mild = label_skew(ds, shards(ds, 16, seed=0, alpha=100.0))
    assert iid < 0.2 and skewed > 0.6 and skewed > 3 * iid
    assert mild < 0.3


def test_shard_errors():
    ds = load_dataset("synthetic:10", split="all")
    one_line_error("cannot split", shards, ds, 11, 0)
    one_line_error("alpha must be > 0", shards, ds, 2, 0, alpha=0.0)
    reg = Dataset(torch.zeros(4, 1), torch.zeros(4), None, "reg")
    one_line_error("integer class labels", shards, reg, 2, 0, alpha=1.0)
