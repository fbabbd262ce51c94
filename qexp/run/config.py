"""The typed schema of the top-level training config (Hydra structured config), and the one declaration
of each top-level default: ``configs/train.yaml`` holds only the defaults list and Hydra's settings.

Groups (dataset, model, method, optim, sched) stay free-form: their YAML files are the registry and
their ``_target_`` callables type-check their own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class TrainerConfig:
    """How a run is executed, not what it computes (so not part of the run folder or resume check)."""

    devices: int = 1  # >1: DDP over this many processes (nccl on GPUs, gloo on CPU); or launch with torchrun
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False  # DDP option for methods with parameters unused by forward
    # K > 1: seeds seed..seed+K-1 trained in this process as one vectorised model (qexp.run.seeds), each
    # in its own seed's folder; pays on a GPU (fewer kernel launches), not on a CPU
    seeds_per_process: int = 1


@dataclass
class TensorBoardConfig:
    """Optional TensorBoard extras (they do not change the result)."""

    step_every: int = 0  # >0: training loss and lr every that many optimizer steps
    histograms: bool = False  # per-epoch weight histograms of the conv/linear layers (quantized values)


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    optim: Any = MISSING
    sched: Any = MISSING
    name: str = "runs"  # first folder level under out_root: an experiment preset's name, or "runs"
    bits: int = 32  # the bit budget; each method config sets its paper default
    # weight-grid scale s of the weight-quantizing methods (bc, sr, r, big_sr, learned): "glorot" (per
    # layer sqrt(6/(fan_in+fan_out))) or a number; top-level so one preset can set it for a method sweep
    grid_scale: Any = "glorot"
    # a run folder whose checkpoint's model weights start this run (fresh optimizer, schedule, epochs);
    # e.g. Yin et al.'s instability experiment continues a clipped-ReLU run with the identity STE
    init_from: Any = None
    abits: Any = None  # activation bits of methods that quantize weights and activations (lsq, pact, dorefa)
    seed: int = 0
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 1000
    lr: float = "${optim.lr}"  # type: ignore[assignment]  # the optimizer option's rate unless set
    # auto | cpu | cuda | cuda:N (checked when the run starts); $QEXP_DEVICE sets the default (the test
    # suite sets cpu: its exact numbers were measured there; its cuda tests ask for cuda themselves)
    device: str = "${oc.env:QEXP_DEVICE,auto}"
    data_root: str = "${oc.env:QEXP_DATA,./data}"
    out_root: str = "outputs"
    resume: bool = True
    # when another live process trains the same run folder: fail | wait | auto (fail; wait in a sweep)
    lock: str = "auto"
    progress: Any = None  # null: a progress bar when stderr is a terminal; true/false to force
    # early stopping: epochs without a lower validation error (needs dataset.val_size)
    patience: int | None = None
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    # what hydra/sweeper=optuna minimises (qexp.run.tune): best_val_error | val_error (never test)
    objective: str = "best_val_error"
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (CUDA): conv/linear math in 16 bits (qexp.run.precision)
    compile: bool = False  # torch.compile the step's forward/backward with the method's quantizers
    cuda_graphs: bool = False  # with compile=true on CUDA: replay the compiled graphs as CUDA graphs
    threads: int | None = None  # torch math threads; null: all cores, or cores // n_jobs in a local parallel sweep
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


#: keys that do not change a run's result, so neither its folder nor its resume check depends on them
#: (``dataset.download``: whether missing files may be fetched; the data digest names the files read)
VOLATILE_KEYS = ("resume", "lock", "device", "data_root", "out_root", "progress", "threads", "compile",
                 "cuda_graphs", "trainer", "objective", "tensorboard", "dataset.download")


#: top-level knobs read only through interpolations (``method.bits: ${bits}``, ``method.scale:
#: ${grid_scale}``), and ``optim.lr`` (the optimizer is built with the top-level ``lr``, which follows it
#: unless set): the keys that consume them carry their value, so two spellings of one setting
#: (``bits=4`` / ``method.bits=4``, ``optim.lr=0.01`` / ``lr=0.01``) give one identity
SOURCE_KEYS = ("bits", "abits", "grid_scale", "optim.lr")


def method_reads(method: dict[str, Any], knob: str) -> bool:
    """Whether a method's unresolved config reads the top-level ``knob``: one of its values interpolates
    ``${knob}`` (``method.scale: ${grid_scale}``); float's has no ``scale``, STE's no ``abits``."""
    return any("${" + knob + "}" in str(v) for v in method.values())


#: config folders that are data for other commands, not choices of a run (hidden from ``train --help``)
INTERNAL_GROUPS = ("reference",)


def config_groups() -> str:
    """``group: option, option`` lines for ``qexp train --help`` (the help template's ``${qexp_groups:}``):
    Hydra's own listing minus its ``hydra/`` groups and :data:`INTERNAL_GROUPS`. Hydra resolves the help
    template at every composition, so the listing is kept per search path (walking it took seconds)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ""
    loader = GlobalHydra.instance().config_loader()
    key = tuple((src.provider, src.path) for src in loader.get_sources())
    if key not in _GROUPS:
        _GROUPS[key] = _list_groups(loader)
    return _GROUPS[key]


#: :func:`config_groups` by search path
_GROUPS: dict[tuple[tuple[str, str], ...], str] = {}


def _list_groups(loader: Any) -> str:
    from hydra.core.object_type import ObjectType

    def walk(parent: str) -> list[str]:
        out = []
        for group in loader.list_groups(parent):
            name = f"{parent}/{group}" if parent else group
            if name == "hydra" or name in INTERNAL_GROUPS:
                continue
            if loader.get_group_options(name, ObjectType.CONFIG):
                out.append(name)
            out += walk(name)
        return out

    return "".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}\n" for g in sorted(walk("")))


def register() -> None:
    """Store the schema so ``train.yaml`` can name it in its defaults list, and the help's group-listing
    resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="qexp_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("qexp_groups"):
        OmegaConf.register_new_resolver("qexp_groups", config_groups, use_cache=False)
