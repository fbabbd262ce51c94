"""dataset=cifar10_jpeg: the JPEG copy of CIFAR-10, decoded once into a cache keyed by the archive's md5.

The one-time decode (~15 s on a busy 2-core machine) is done by a first `qexp train` in a session fixture
whose cache folder is a temporary one (never the user's ~/.cache, never the data folder); the other
tests read that cache.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from qexp.data import cifar10_jpeg as cj
from qexp.data.common import digest as data_digest
from qexp.errors import QexpError
from qexp.report import reference as refs
from qexp.report import results
from qexp.report.table import build_view
from qexp.run.session import build
from tests.conftest import compose_train, find_runs, read_metrics, run_qexp

CIFAR_PRESETS = ("li2017_cifar10", "bc2015_cifar10", "wage_cifar10", "yin2019_cifar10", "baselines_cifar10")


TRAIN = ["train", "dataset=cifar10_jpeg", "model=lenet5", "dataset.train_subset=1024", "dataset.test_subset=1000",
         "epochs=1", "batch_size=128", "device=cpu", "threads=1"]


@pytest.fixture(scope="session")
def first_run(data_root, tmp_path_factory) -> tuple[Path, Path, str]:
    """`qexp train` on an empty cache folder (so it decodes, once per session): (cache, out, log)."""
    cache, out = tmp_path_factory.mktemp("qexp-cache"), tmp_path_factory.mktemp("cifar-out")
    proc = run_qexp([*TRAIN, f"out_root={out}", f"data_root={data_root}"],
                    env={"QEXP_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    return cache, out, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def jpeg_cache(first_run) -> Path:
    return first_run[0]


@pytest.fixture
def use_cache(jpeg_cache, monkeypatch) -> Path:
    monkeypatch.setenv("QEXP_CACHE", str(jpeg_cache))
    return jpeg_cache


def _cache_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow
def test_decoded_split_labels_and_class_interleaved_order(data_root, use_cache) -> None:
    arrays, digest = cj.load_arrays(data_root)
    assert digest.startswith("7c81e05f")  # the archive's md5 in the data README
    assert list(_cache_files(use_cache)) == [f"cifar10_jpeg-v{cj.CACHE_VERSION}-{digest}.pt"]
    for split, n in (("train", 50_000), ("test", 10_000)):
        x, y = arrays[split]
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(y.bincount(), torch.full((10,), n // 10))
        assert torch.equal(y[:20], torch.arange(20) % 10)  # image i of class c at 10 i + c
    # real photographs, not blank decodes: CIFAR-10's channel means (0.491, 0.482, 0.447) within JPEG error
    mean = arrays["train"][0][:5000].float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01)


@pytest.mark.slow
def test_unpacked_tree_reads_the_same_images(data_root, use_cache, tmp_path, monkeypatch) -> None:
    """The tree form of the archive decodes to the same pixels in the same (interleaved) order."""
    arrays, _ = cj.load_arrays(data_root)
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "root" / cj.FOLDER
    with tarfile.open(data_root / cj.FOLDER / cj.ARCHIVE) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and parts[-1] in ("0000.jpg", "0001.jpg"):
                out = base / Path(*parts[-3:])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    tree, digest = cj.load_arrays(tmp_path / "root")
    assert len(_cache_files(tmp_path / "cache")) == 1 and digest not in str(list(_cache_files(use_cache)))
    for split in cj.SPLITS:
        assert torch.equal(tree[split][0], arrays[split][0][:20])
        assert torch.equal(tree[split][1], arrays[split][1][:20])
    assert cj.load_arrays(tmp_path / "root")[1] == digest
    # a run on the tree is identified by its listing (it once carried no data digest: other images under
    # the same root answered for a finished run)
    sources = cj.build(str(tmp_path / "root"), augment=False).sources
    assert sources == (base,) and data_digest(tmp_path / "root", sources)["digest"]


def test_missing_data_is_one_line_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QexpError) as e:
        cj.load_arrays(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cifar10-jpeg.tar.gz" in msg and "train,test}/<class>/NNNN.jpg" in msg
    assert not (tmp_path / "cache").exists()


def test_damaged_archive_is_a_user_error_and_leaves_no_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    (tmp_path / cj.FOLDER).mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("train/cat/0000.jpg")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"notjp"))
    (tmp_path / cj.FOLDER / cj.ARCHIVE).write_bytes(buf.getvalue()[:-30])
    with pytest.raises(QexpError, match="cifar10_jpeg"):
        cj.load_arrays(tmp_path)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_train_loader_augments_on_the_device_and_subsets_are_balanced(data_root, use_cache) -> None:
    data = cj.build(root=str(data_root), batch_size=100, train_subset=1000, val_size=100, seed=3)
    assert data.name == "cifar10_jpeg" and data.in_shape == (3, 32, 32) and data.num_classes == 10
    assert data.info["source_md5"].startswith("7c81e05f")
    assert [p.name for p in data.sources] == [cj.ARCHIVE]  # the run's data digest covers the archive
    assert torch.equal(data.train.labels.bincount(), torch.full((10,), 90))
    assert torch.equal(data.val.labels.bincount(), torch.full((10,), 10))
    assert data.test.num_samples == 10_000
    small = cj.build(root=str(data_root), train_subset=100, test_subset=500)
    assert torch.equal(small.test.labels.bincount(), torch.full((10,), 50))
    with pytest.raises(QexpError, match="test_subset"):
        cj.build(root=str(data_root), test_subset=10_001)
    plain = cj.build(root=str(data_root), batch_size=100, train_subset=1000, val_size=100, seed=3,
                     augment=False)
    x_aug, y_aug = next(iter(data.train))
    x_plain, y_plain = next(iter(plain.train))
    assert torch.equal(y_aug, y_plain) and not torch.equal(x_aug, x_plain)  # same order, augmented
    again, _ = next(iter(cj.build(root=str(data_root), batch_size=100, train_subset=1000, val_size=100,
                                  seed=3).train))
    assert torch.equal(x_aug, again)  # seeded like the loader: a function of (seed, epoch, batch)


@pytest.mark.slow
@pytest.mark.parametrize("preset", CIFAR_PRESETS)
def test_cifar_presets_compose_and_build_with_the_jpeg_copy(preset, data_root, use_cache) -> None:
    cfg = compose_train([f"+experiment={preset}", "dataset=cifar10_jpeg", "dataset.train_subset=256",
                         f"data_root={data_root}", "device=cpu"])
    assert cfg.dataset.name == "cifar10_jpeg"
    proper = compose_train([f"+experiment={preset}"]).dataset  # the preset's data choices carry over
    assert (cfg.dataset.normalize, cfg.dataset.augment) == (proper.normalize, proper.augment)
    built = build(cfg, torch.device("cpu"))
    x, y = next(iter(built.data.train))
    assert built.model(x[:8]).shape == (8, 10)
    # the preset's input range survives the dataset switch (WAGE: [-1, 1])
    if cfg.dataset.normalize == "signed":
        assert x.min() >= -1 and x.max() <= 1


@pytest.mark.slow
def test_train_builds_the_cache_once_and_reuses_it(data_root, first_run, tmp_path) -> None:
    """The first run decoded into the empty cache folder; a second run reads it and leaves it untouched."""
    cache, out, log = first_run
    assert "decoding" in log
    before = _cache_files(cache)
    assert len(before) == 1
    (run,) = find_runs(out)
    assert "cifar10_jpeg" in run.parts
    m = read_metrics(run)
    assert m["status"] == "completed" and m["dataset"] == "cifar10_jpeg"
    assert m["test_error"] < 85.0  # learned from 1024 real images in 8 steps (measured: 73.4 and 78.8, seeds 0-1)
    again = run_qexp([*TRAIN, "seed=1", f"out_root={tmp_path}", f"data_root={data_root}"],
                     env={"QEXP_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert "decoding" not in again.stdout + again.stderr
    assert _cache_files(cache) == before
    assert read_metrics(find_runs(tmp_path)[0])["status"] == "completed"


def test_ref_compares_with_the_papers_cifar10_and_says_it_is_a_jpeg_copy() -> None:
    """`--ref` matches cifar10_jpeg cells to the paper's CIFAR-10 numbers, with the JPEG note; a table of
    real CIFAR-10 runs has no such note."""
    ref = refs.load("li2017")
    notes = {}
    for dataset in ("cifar10_jpeg", "cifar10"):
        run = {"status": "completed", "test_error": 9.0, "dataset": dataset}
        cell = (("bc_li", "1"), (dataset, "vgg9"))
        grid = results.Grid(["method", "bits"], ["dataset", "model"], "test_error", [cell[0]], [cell[1]],
                            {cell: results.Cell([run], "test_error")})
        view = build_view(grid, ref)
        (bc,) = [line for line in view.body if line[0].text == "bc_li"]
        assert [s.text for s in bc[2:5]] == ["9.00 (1)", "8.21", "+0.79"]  # ours (n), paper, ours - paper
        notes[dataset] = " ".join(view.notes)
    assert "JPEG copy" in notes["cifar10_jpeg"] and "JPEG" not in notes["cifar10"]
