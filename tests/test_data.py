"""Loaders on the real data in $QEXP_DATA, the CIFAR pickle reader, batching and augmentation."""

from __future__ import annotations

import shutil

import pytest
import torch

from qexp.data import cifar, imagenet, mnist, synthetic
from qexp.data.common import digest, same_files_under
from qexp.data.loader import Normalize, TensorLoader, crop_flip
from qexp.errors import QexpError
from tests.test_config import write_cifar


def test_mnist_real(data_root):
    arrays = mnist.load_arrays("mnist", data_root, download=False)
    xtr, ytr = arrays["train"]
    xte, yte = arrays["test"]
    assert xtr.shape == (60000, 1, 28, 28) and xtr.dtype == torch.uint8
    assert len(xte) == len(yte) == 10000
    assert ytr[:5].tolist() == [5, 0, 4, 1, 9]
    assert yte[:3].tolist() == [7, 2, 1]
    assert sorted(ytr.unique().tolist()) == list(range(10))


def test_fashion_mnist_real(data_root):
    arrays = mnist.load_arrays("fashion_mnist", data_root, download=False)
    xtr, ytr = arrays["train"]
    assert xtr.shape == (60000, 1, 28, 28) and len(arrays["test"][1]) == 10000
    assert ytr[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, T-shirt


def test_mnist_bundle_subset_and_validation(data_root):
    b = mnist.build("mnist", str(data_root), batch_size=100, train_subset=1000, val_size=200)
    assert b.train.num_samples == 800 and b.val.num_samples == 200 and b.test.num_samples == 10000
    x, y = next(iter(b.train))
    assert x.shape == (100, 1, 28, 28)
    assert abs(x.mean().item()) < 0.3  # standardised


def test_uncompressed_idx_files_are_read_too(data_root, tmp_path):
    import gzip

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").glob("*.gz"):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    arrays = mnist.load_arrays("mnist", tmp_path, download=False)
    assert arrays["train"][1][:5].tolist() == [5, 0, 4, 1, 9]


def test_cifar_pickle_reader(tmp_path):
    write_cifar(tmp_path, "cifar10", n=30)
    write_cifar(tmp_path, "cifar100", n=30)
    c10 = cifar.load_arrays("cifar10", tmp_path, download=False)
    assert c10["train"][0].shape == (150, 3, 32, 32) and c10["test"][0].shape == (30, 3, 32, 32)
    c100 = cifar.build("cifar100", str(tmp_path), batch_size=16, download=False)
    assert c100.num_classes == 100 and c100.in_shape == (3, 32, 32)
    # the channel-major layout of the pickles is kept: pixel (c, i, j) = data[c*1024 + i*32 + j]
    import pickle

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert c10["train"][0][0, 2, 3, 4].item() == raw[0][2 * 1024 + 3 * 32 + 4]


def test_imagefolder_on_imagenette(data_root):
    b = imagenet.build(str(data_root), dirname="imagenette-mini", image_size=64, batch_size=16,
                       eval_batch_size=50, workers=0)
    assert b.num_classes == 10 and b.train.num_samples == 400 and b.test.num_samples == 100
    x, y = next(iter(b.train))
    assert x.shape == (16, 3, 64, 64) and y.dtype == torch.long


def test_imagefolder_runs_are_identified_by_their_folders(data_root, tmp_path):
    """An ImageFolder run's data digest covers train/ and val/ (each file's relative path and size): other
    images under the same root name give another digest (a finished run on them was reported for the
    first data), the same files elsewhere the same one."""
    b = imagenet.build(str(data_root), dirname="imagenette-mini", image_size=32, workers=0)
    first = digest(data_root, b.sources)
    assert sorted(first["files"]) == ["imagenette-mini/train", "imagenette-mini/val"] and first["digest"]
    copy = tmp_path / "copy" / "imagenette-mini"
    shutil.copytree(data_root / "imagenette-mini", copy)
    assert digest(tmp_path / "copy", imagenet.build(str(tmp_path / "copy"), dirname="imagenette-mini",
                                                     image_size=32, workers=0).sources)["digest"] == first["digest"]
    assert same_files_under(tmp_path / "copy", first["files"]) == first["digest"]
    next(p for p in sorted((copy / "train").rglob("*")) if p.is_file()).unlink()
    assert same_files_under(tmp_path / "copy", first["files"]) not in (None, first["digest"])


def test_a_dataset_folder_outside_the_root_is_checked_where_it_is(data_root, tmp_path):
    """``dataset.dirname=/abs/folder``: the sources lie outside the data root and are stored by their
    absolute names; a finished run is checked against those files (it was always "missing", so an
    identical rerun was refused instead of skipped)."""
    b = imagenet.build(str(tmp_path / "elsewhere"), dirname=str(data_root / "imagenette-mini"), image_size=16,
                       workers=0)
    first = digest(tmp_path / "elsewhere", b.sources)
    assert all(name.startswith("/") for name in first["files"])
    assert same_files_under(tmp_path / "elsewhere", first["files"], first["root"]) == first["digest"]
    # under another root a dirname=../x would name other files: not known before loading
    assert same_files_under(tmp_path / "another", first["files"], first["root"]) is None
    assert same_files_under(tmp_path / "elsewhere", first["files"]) is None
    assert same_files_under(tmp_path, {str(tmp_path / "gone"): "0"}, str(tmp_path.resolve())) is None


@pytest.mark.parametrize(("option", "why"), [({"image_size": 0}, "image_size"), ({"workers": -1}, "workers"),
                                             ({"train_subset": 0}, "1..400"), ({"train_subset": 401}, "1..400")])
def test_imagefolder_options_out_of_range_are_one_line(data_root, option, why):
    """image_size=0 was a traceback, train_subset=0 trained on no image, 401 was cut to 400 silently."""
    with pytest.raises(QexpError, match=why):
        imagenet.build(str(data_root), dirname="imagenette-mini", **{"workers": 0, **option})


def test_shuffle_is_a_function_of_seed_and_epoch_and_resumable():
    x, y = synthetic.make(100, (1, 8, 8), 10, seed=0)
    loader = TensorLoader(x, y, 16, Normalize((0.5,), (0.25,)), shuffle=True, seed=3)
    loader.set_epoch(1)
    full = [b[1] for b in loader]
    again = [b[1] for b in loader.iter_from(2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], again))
    loader.set_epoch(2)
    assert not torch.equal(torch.cat(full), torch.cat([b[1] for b in loader]))
    assert sorted(torch.cat(full).tolist()) == sorted(y.tolist())


def test_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).to(torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output pixel is either padding (0) or a pixel of the same image and channel
    for i in range(2):
        for c in range(3):
            vals = set(out[i, c].flatten().tolist()) - {0}
            assert vals <= set(x[i, c].flatten().tolist())


def test_missing_data_message_names_the_files(tmp_path):
    import pytest

    from qexp.errors import QexpError

    with pytest.raises(QexpError) as e:
        mnist.load_arrays("mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz" in str(e.value) and str(tmp_path) in str(e.value)
    assert len(str(e.value).splitlines()) == 1  # one line, as every bad input is
    with pytest.raises(QexpError) as e:  # an ImageFolder tree: where it is looked for, and how to name another
        imagenet.build(str(tmp_path), dirname="imagenet")
    assert str(tmp_path / "imagenet") in str(e.value) and "dataset.dirname=NAME" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_deferred_batches_gather_to_the_same_values() -> None:
    """Seeds stacked in one process gather their batches together (``TensorLoader.defer``): the same
    images and labels, in each seed's own order, as the batches each loader yields itself."""
    from qexp.data.loader import Normalize, Rows, TensorLoader, same_data, stack_batches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (50,), generator=g)
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    loaders = [TensorLoader(images.clone(), labels, 16, norm, shuffle=True, seed=s) for s in range(3)]
    assert same_data(loaders[0], loaders[1])
    plain = [list(ld) for ld in loaders]
    for ld in loaders:
        ld.defer = True
    deferred = [list(ld) for ld in loaders]
    assert isinstance(deferred[0][0][0], Rows) and len(deferred[0][-1][0]) == 2
    for b in range(4):
        xs, ys = stack_batches([deferred[s][b] for s in range(3)])
        assert torch.equal(xs, torch.stack([plain[s][b][0] for s in range(3)]))
        assert torch.equal(ys, torch.stack([plain[s][b][1] for s in range(3)]))
    other = TensorLoader(images.flip(0), labels, 16, norm, shuffle=True)
    assert not same_data(loaders[0], other)
