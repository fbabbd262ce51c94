"""Every option of every config group composes and instantiates; the schema rejects bad values."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qexp.errors import QexpError
from qexp.run.session import build, instantiate
from tests.conftest import compose_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def write_cifar(root: Path, variant: str, n: int = 20) -> None:
    """Tiny files in the real CIFAR python-pickle format."""
    folder, files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels"),
    }[variant]
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    classes = 10 if variant == "cifar10" else 100
    for f in files:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: rng.integers(0, classes, n).tolist()}
        with open(root / folder / f, "wb") as fh:
            pickle.dump(d, fh)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory, data_root) -> Path:
    """A data root with real MNIST/Fashion-MNIST/imagenette (links) and tiny CIFAR pickles."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        (root / name).symlink_to(data_root / name)
    (root / "imagenet").symlink_to(data_root / "imagenette-mini")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    write_cifar10_jpeg(root)
    return root


def write_cifar10_jpeg(root: Path, per_class: int = 2) -> None:
    """A tiny unpacked tree in the cifar10_jpeg layout (train|test/<class>/NNNN.jpg, real JPEG files)."""
    from PIL import Image

    from qexp.data.cifar10_jpeg import CLASSES, FOLDER, SPLITS

    rng = np.random.default_rng(0)
    for split in SPLITS:
        for cls in CLASSES:
            folder = root / FOLDER / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")


def test_groups_are_populated():
    for group in ("dataset", "model", "method", "optim", "sched"):
        assert options(group), group
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic"} <= set(options("dataset"))
    assert {"lenet5", "mlp", "vgg7", "vgg9", "resnet20", "resnet32", "resnet56", "resnet18", "wrn",
            "wrn56_2"} <= set(options("model"))
    assert {"float"} <= set(options("method"))
    assert {"sgd", "adam"} <= set(options("optim"))
    assert {"constant", "step", "cosine", "exp"} <= set(options("sched"))


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_instantiates(option, fake_root, tmp_path, monkeypatch):
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))  # cifar10_jpeg's decoded copy
    extra = ["dataset.image_size=32", "dataset.workers=0"] if option == "imagenet" else []
    cfg = compose_train([f"dataset={option}", f"data_root={fake_root}", *extra])
    data = instantiate(cfg.dataset, root=str(fake_root), batch_size=8, eval_batch_size=16, seed=0,
                       device="cpu")
    x, y = next(iter(data.train))
    assert x.shape[1:] == data.in_shape and x.dtype == torch.float32
    assert y.max() < data.num_classes


SHAPES = {"resnet18": (3, 64)}


@pytest.mark.parametrize("option", options("model"))
def test_model_instantiates(option):
    cfg = compose_train([f"model={option}"])
    c, size = SHAPES.get(option, (1, 28) if option in ("lenet5", "mlp") else (3, 32))
    model = instantiate(cfg.model, in_channels=c, num_classes=10, image_size=size)
    assert model(torch.randn(2, c, size, size)).shape == (2, 10)


@pytest.mark.parametrize("option", options("method"))
def test_method_instantiates(option):
    cfg = compose_train([f"method={option}"])
    method = instantiate(cfg.method)
    assert method.name == cfg.method.name
    lo, hi = method.bits_range
    assert lo <= cfg.bits <= hi, "a method's default bits must be in its own range"


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("sched", options("sched"))
def test_optim_and_sched_instantiate(optim, sched):
    cfg = compose_train([f"optim={optim}", f"sched={sched}", "dataset=synthetic", "epochs=3"])
    b = build(cfg, torch.device("cpu"))
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr)
    for _ in range(3):
        b.optimizer.step()
        b.scheduler.step()


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_presets_compose(option):
    cfg = compose_train([f"+experiment={option}"])
    assert cfg.name == option
    OmegaConf.to_container(cfg, resolve=True)


def test_lr_defaults_to_the_optimizer_and_can_be_overridden():
    assert compose_train(["optim=sgd"]).lr == 0.1
    assert compose_train(["optim=sgd", "lr=0.05"]).lr == 0.05


def test_exp_schedule_reaches_final_ratio():
    cfg = compose_train(["sched=exp", "dataset=synthetic", "epochs=5", "lr=0.003"])
    b = build(cfg, torch.device("cpu"))
    for _ in range(4):
        b.optimizer.step()
        b.scheduler.step()
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(2e-6, rel=1e-6)


def test_schema_rejects_bad_types():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    for bad in ("bits=abc", "epochs=1.5", "threads=abc", "resume=maybe"):
        with pytest.raises(ConfigCompositionException) as e:
            compose_train([bad])
        assert isinstance(e.value.__cause__, ValidationError), bad


def test_bad_component_option_is_a_user_error():
    cfg = compose_train(["model=vgg7", "model.layout=vgg99"])
    with pytest.raises(QexpError, match="unknown VGG layout"):
        instantiate(cfg.model, in_channels=3, num_classes=10, image_size=32)
