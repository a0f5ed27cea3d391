"""The one typed configuration of fedtail.

`FedtailConfig` is the single source of truth. YAML files (``params.yaml`` is the default, ``configs/``
holds presets), CLI ``--set a.b=v`` overrides, Prefect flow parameters and Flower run-config entries
(flat dotted keys) all map onto it through `load_config` / `apply_overrides`. Every value is checked
before any work starts; errors name the field and the allowed values.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedtail.registry import (
    ADJUSTMENTS,
    ATTACKS,
    AUGMENTATIONS,
    CONTINUAL,
    DATASETS,
    ENGINES,
    MODELS,
    OBJECTIVES,
    PARTITIONERS,
    SEMISUP,
    STRATEGIES,
    Registry,
    check_options,
)

if TYPE_CHECKING:
    import numpy as np

DEFAULT_CONFIG_FILE = "params.yaml"


class ConfigError(ValueError):
    """Invalid configuration: the message names each bad field and what it allows."""


class _Section(BaseModel):
    """Every section: unknown keys refused; strict types (``true`` is not 1, ``"3"`` is not 3, but an int
    is a fine float); ``.inf`` / ``.nan`` refused in every float field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _known(registry: Registry, value: str) -> str:
    value = value.lower()
    if value not in registry:
        shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
        raise ValueError(f"unknown {registry.kind} {shown}; known: {', '.join(registry.names())}")
    return value


def _plugin_name(registry: Registry) -> Any:
    """A ``str`` type that must name a plug-in of ``registry`` (lower-cased; errors list the known)."""
    return Annotated[str, AfterValidator(functools.partial(_known, registry))]


DatasetName = _plugin_name(DATASETS)
PartitionerName = _plugin_name(PARTITIONERS)
StrategyName = _plugin_name(STRATEGIES)
ObjectiveName = _plugin_name(OBJECTIVES)
ContinualName = _plugin_name(CONTINUAL)
EngineName = _plugin_name(ENGINES)
AdjustmentName = _plugin_name(ADJUSTMENTS)
AttackName = _plugin_name(ATTACKS)
SemisupName = _plugin_name(SEMISUP)


def _augmentation(value: str) -> str:
    return value.lower() if value.lower() == "auto" else _known(AUGMENTATIONS, value)


AugmentationName = Annotated[str, AfterValidator(_augmentation)]


def _checked_options(
    registry: Registry, name_field: str, options: dict[str, Any], info: ValidationInfo
) -> Any:
    name = info.data.get(name_field)
    return options if name is None else check_options(registry, name, options)  # None: name already failed


def _plugin_options(registry: Registry, name_field: str) -> Any:
    """A ``dict`` checked against the ``Options`` of the plug-in that the sibling ``name_field`` names.

    The default (``{}``) is validated too, so options left out are filled with their defaults exactly as
    options written out are: one config has one form (`FedtailConfig.to_yaml`, every fingerprint), and a
    run resumed from its own ``config.yaml`` is recognised as the same experiment.
    """
    return Annotated[
        dict[str, Any],
        Field(validate_default=True),
        AfterValidator(functools.partial(_checked_options, registry, name_field)),
    ]


RUN_ID_RULE = "a name of letters, digits, '.', '_', '-', starting with a letter or digit, at most 100 chars"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(name: str) -> str:
    """``name`` if it is a plain folder name (no path, no ``..``, no leading ``-``); else ValueError."""
    if not isinstance(name, str) or not _RUN_ID.fullmatch(name):
        raise ValueError(f"run id {name!r} is not allowed: use {RUN_ID_RULE}")
    return name


def _check_device(device: str) -> str:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "engine.device='cuda' but torch.cuda.is_available() is False; allowed here: auto, cpu"
            )
    return device


CRON_HINT = 'write a list: cron: ["0 3 * * *", "30 12 * * 1-5"]'


@functools.lru_cache(maxsize=256)
def _cron_problem(expr: str) -> str | None:
    """Why Prefect's `CronSchedule` refuses ``expr``: its own parser, so `fedtail serve` cannot fail later."""
    from prefect._vendor.croniter import croniter
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=expr)
    except ValidationError as err:
        try:
            croniter(expr)
        except Exception as parse_err:  # croniter says why (field out of range, column count, ...)
            reason = str(parse_err).replace(f"[{expr}] is not acceptable, ", "").replace(f"[{expr}] ", "")
        else:
            reason = err.errors()[0]["msg"].removeprefix("Value error, ")
        fields = expr.split()
        for i, (name, value) in enumerate(zip(_CRON_FIELDS, fields, strict=False)):
            alone = " ".join(value if j == i else "*" for j in range(len(_CRON_FIELDS)))
            if len(fields) == len(_CRON_FIELDS) and not croniter.is_valid(alone):
                return f"{name} {value}: {reason}"  # which field croniter objects to
        return reason
    return None


_CRON_FIELDS = ("minute", "hour", "day of month", "month", "day of week")


def _check_cron(entries: list[str], info: ValidationInfo) -> list[str]:
    if (info.context or {}).get("schedule") is False:
        return entries  # a ClientApp re-reading a checked config: no need to import Prefect there
    for expr in entries:
        problem = _cron_problem(expr)
        if problem:
            raise ValueError(f"{expr!r} is not a valid cron expression ({problem}); {CRON_HINT}")
    return entries


def _check_deployment_name(name: str, info: ValidationInfo) -> str:
    if (info.context or {}).get("schedule") is False:
        return name  # a ClientApp re-reading a checked config: no need to import Prefect there
    from prefect.types.names import BANNED_CHARACTERS, WITHOUT_BANNED_CHARACTERS  # what Prefect refuses

    if not re.fullmatch(WITHOUT_BANNED_CHARACTERS, name) or not name.isprintable():
        raise ValueError(
            f"{name!r} is not a Prefect deployment name: non-empty, printable, none of {BANNED_CHARACTERS}"
        )
    return name


def _one_or_list(value: Any) -> Any:
    """A single cron string is one entry; anything else is checked as a list."""
    return [value] if isinstance(value, str) else value


def _check_path_text(path: str) -> str:
    if not path or not path.isprintable():
        raise ValueError(f"{path!r} is not a usable folder path (empty, or control characters)")
    return path


PathText = Annotated[str, Field(max_length=4096), AfterValidator(_check_path_text)]


class DatasetConfig(_Section):
    """Which raw data to use and how to split it into train/test."""

    name: DatasetName = Field("digits", description="Registered dataset name.")
    root: PathText | None = Field(None, description="Local torchvision root for mnist/fashion-mnist/cifar.")
    download: bool = Field(False, description="Allow torchvision to download into `root`.")
    num_samples: int = Field(4000, ge=100, le=200_000, description="mnist1d: samples generated (fixed seed).")
    test_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="Held-out share for datasets without a test split."
    )
    classes: list[int] | None = Field(
        None,
        description="Keep only these classes, relabelled 0..k-1 in this order (e.g. [3, 8]: a binary "
        "task with 3 as class 0); null keeps every class.",
    )


class PartitionConfig(_Section):
    """Global long-tail profile, then a non-IID split over clients, then the labeled/unlabeled split."""

    method: PartitionerName = Field(
        "dirichlet",
        description="Registered partitioner: iid, dirichlet, pathological, shard, quantity_skew.",
    )
    alpha: float = Field(
        0.5, gt=0.0, le=1e6, description="dirichlet: concentration; smaller = more label skew (1e6 is IID)."
    )
    min_partition_size: int = Field(
        5,
        ge=0,
        description="dirichlet: resample until every client holds at least this many; quantity_skew: "
        "every client's floor (at least 1).",
    )
    options: _plugin_options(PARTITIONERS, "method") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Partitioner options, as its `Options` declares."
    )
    imbalance_factor: float = Field(
        10.0, ge=1.0, le=1e6, description="Long tail n_max / n_min over classes (1 = keep data balanced)."
    )
    profile: Literal["exponential", "step"] = Field(
        "exponential",
        description="Long-tail shape: exponential decay over classes (CIFAR-LT) or step (a share of "
        "minority classes with n_max / imbalance_factor samples each).",
    )
    step_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="step profile: share of classes that are minority classes (mu)."
    )
    labeled_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of each client's samples that keep their label."
    )
    labeled_imbalance_factor: float | None = Field(
        None,
        ge=1.0,
        le=1e6,
        description="Imbalance factor of the labeled part alone (semi-supervised long tail: labeled head "
        "round(labeled_fraction x kept head), then the same profile; null = each client's class mix).",
    )

    unlabeled_distribution: Literal["rest", "consistent", "uniform", "reversed"] = Field(
        "rest",
        description="Class distribution of the unlabeled part (SimPro's protocol): rest, every sample "
        "without a label; consistent, the labeled part's long tail; uniform; reversed, class 0 the tail. "
        "Unlabeled samples beyond it are dropped.",
    )
    unlabeled_imbalance_factor: float | None = Field(
        None,
        ge=1.0,
        le=1e6,
        description="Imbalance factor of a consistent or reversed unlabeled part (null: the labeled "
        "part's, else imbalance_factor).",
    )
    novel_classes: list[int] | None = Field(
        None,
        description="Open world: classes that keep no label on any client (all their samples unlabeled).",
    )

    @property
    def all_labeled(self) -> bool:
        """Whether every sample keeps its label (no unlabeled part): the whole labeled fraction, no
        labeled long tail of its own, no class held out of the labels."""
        return (
            self.labeled_fraction >= 1.0 and self.labeled_imbalance_factor is None and not self.novel_classes
        )

    @model_validator(mode="after")
    def _partitioner_rules(self) -> PartitionConfig:
        check = getattr(PARTITIONERS.get(self.method), "check_config", None)  # its option combinations
        problem = check(self) if check is not None else None
        if problem:
            raise ValueError(problem)
        return self


class TasksConfig(_Section):
    """Class-incremental schedule. ``classes_per_task = null`` means one task with all classes."""

    classes_per_task: int | None = Field(2, ge=1, description="Classes introduced by each task.")
    first_task_classes: int | None = Field(
        None,
        ge=1,
        description="Classes of the first task, the others then come classes_per_task at a time (B-half: "
        "half the classes); null: the first task is like the others (B0).",
    )
    sizes: list[int] | None = Field(
        None, description="Classes of each task, in order (uneven tasks; overrides the two fields above)."
    )
    shuffle_classes: bool = Field(True, description="Seeded shuffle of the class order.")
    blurry: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of each task's samples presented during the task before it (blurry boundaries).",
    )
    late_join_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of clients that join at a later task (drawn 1..T-1)."
    )
    skip_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Chance that a client misses each task after the one it joined in."
    )


class FederationConfig(_Section):
    num_clients: int = Field(10, ge=1, le=100_000)
    rounds_per_task: int = Field(4, ge=1, le=100_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="Share of clients sampled per round.")
    min_train_clients: int = Field(1, ge=1, description="Lower bound on clients sampled per round.")


class AttackConfig(_Section):
    """Byzantine clients (robustness experiments); off by default."""

    name: AttackName = Field(
        "none",
        description="Registered attack the attacking clients make (sign_flip, scaling, gaussian); none: "
        "every client is honest.",
    )
    fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Share of the clients that attack: a seeded choice, fixed for the run.",
    )
    options: _plugin_options(ATTACKS, "name") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Attack options, as its `Options` declares."
    )


class StrategyConfig(_Section):
    name: StrategyName = Field("fedavg", description="Registered server strategy.")
    options: _plugin_options(STRATEGIES, "name") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Strategy options, as its `Options` declares."
    )


class TrainConfig(_Section):
    """Local training on each client."""

    objective: ObjectiveName = Field("ce", description="Registered local objective.")
    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    keep_optimizer_state: bool = Field(
        False,
        description="Keep each client's optimiser state (SGD momentum buffers, Adam's moments) in its "
        "client state across the rounds of a task, as a centralised training loop keeps it; a new task "
        "starts afresh, as PyCIL and Avalanche do. false (FedAvg's local SGD, the FL standard): a fresh "
        "optimiser every round.",
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(
        3.0,
        gt=0.0,
        le=1e6,
        description="Each local step's gradients are scaled down to this global L2 norm when larger "
        "(torch.nn.utils.clip_grad_norm_); null: never. A class-incremental task's first steps see a loss "
        "of 3 or more (the new classes' logits were pushed down while absent); unclipped, SGD at lr 0.05, "
        "momentum 0.9 then left the MLP unable to tell the new classes apart in about half the seeds. "
        "At 1.0 the clip also damped the rare, heavily weighted samples re-weighted objectives rely on.",
    )
    sampler: Literal["shuffle", "class_balanced"] = Field(
        "shuffle",
        description="Each epoch's batch stream: shuffle (a permutation) or class_balanced (Kang et al. "
        "2020: a class uniformly, then one of its samples, with replacement; n draws per epoch).",
    )
    oversample: Literal["none", "smote"] = Field(
        "none",
        description="smote: SMOTE (Chawla et al. 2002, imbalanced-learn) tops every class a client holds up "
        "to its largest, interpolating inputs for flat data and features otherwise.",
    )
    smote_k: int = Field(5, ge=1, le=100, description="SMOTE: nearest neighbours to interpolate with.")
    options: _plugin_options(OBJECTIVES, "objective") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Objective options, as its `Options` declares."
    )


class CrtConfig(_Section):
    """Classifier re-training (cRT; Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition", ICLR 2020) as a federated stage after each task's rounds: clients freeze the features
    and train only the classifier with class-balanced sampling and cross-entropy; FedAvg averages it."""

    rounds: int = Field(0, ge=0, le=100_000, description="cRT rounds after each task's rounds (0 = off).")
    epochs: int | None = Field(
        None, ge=1, le=1000, description="Local epochs per cRT round (null: train.epochs)."
    )
    lr: float | None = Field(None, gt=0.0, le=10.0, description="cRT learning rate (null: train.lr).")
    reinit: bool = Field(
        True, description="Re-initialise the task's classes' classifier rows before the stage (the paper)."
    )


class ContinualConfig(_Section):
    method: ContinualName = Field("finetune", description="Registered continual-learning method.")
    options: _plugin_options(CONTINUAL, "method") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Continual-method options, as its `Options` declares."
    )


class ModelConfig(_Section):
    name: str = Field("auto", description="Registered model, or 'auto' to pick by dataset.")
    hidden: int = Field(128, ge=1, le=65_536, description="Hidden width of the MLP / CNN features.")
    depth: int | None = Field(
        None,
        ge=1,
        le=64,
        description="mlp: hidden layers of width `hidden` (null: 2, fedtail's MLP), to match other "
        "libraries' reference MLPs; other models take none.",
    )
    classifier: Literal["linear", "cosine"] = Field(
        "linear", description="linear, or cosine: scale * cos(features, w_j) (LDAM's normalised classifier)."
    )
    cosine_scale: float = Field(30.0, gt=0.0, le=1000.0, description="Scale s of the cosine classifier.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v.lower() if v.lower() == "auto" else _known(MODELS, v)


class EngineConfig(_Section):
    """Where the ClientApps run. The ServerApp and ClientApp are the same on every engine."""

    name: EngineName = Field("inprocess", description="Registered engine: inprocess, ray, ray-actors.")
    workers: int = Field(1, ge=1, le=256, description="inprocess: parallel client processes (1 = none).")
    cpus_per_client: float = Field(
        1.0, gt=0.0, le=1024, description="ray: CPUs reserved per ClientApp; ray-actors: per actor."
    )
    actors: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="ray-actors: long-lived Ray actors that run the ClientApp calls "
        "(null = the cluster's CPUs / cpus_per_client; never more than the clients).",
    )
    threads_per_client: int = Field(1, ge=1, le=256, description="torch threads inside a ClientApp.")
    device: Annotated[Literal["auto", "cpu", "cuda"], AfterValidator(_check_device)] = "auto"
    timeout: float = Field(
        3600.0,
        gt=0.0,
        le=30 * 86400,
        description="Seconds before a client counts as failed. inprocess: the limit of each ClientApp call "
        "(clients run one after another; a call over it is abandoned, its process killed with workers > 1); "
        "ray: how long the server waits for a round's replies (Flower's round timeout); ray-actors: the "
        "limit of each ClientApp call inside its actor (a hung actor is killed and replaced).",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="ray, ray-actors: null = start a private local Ray listening on 127.0.0.1 only; an "
        "address ('auto', 'ray://head:10001') = join that running cluster instead.",
    )
    verbose: bool = Field(False, description="Show Flower's own INFO log lines (strategy banners, rounds).")


class OutputConfig(_Section):
    data_dir: PathText = "data"
    artifacts_dir: PathText = "artifacts"
    runs_dir: PathText = "runs"
    sweeps_dir: PathText = Field("sweeps", description="Where `fedtail sweep` writes sweep folders.")
    run_id: Annotated[str, AfterValidator(check_run_id)] | None = Field(
        None, description="Fixed run id (a folder name, see `check_run_id`); default is time + config hash."
    )


class ServeConfig(_Section):
    """`fedtail serve`: the Prefect deployment and its schedules."""

    name: Annotated[str, AfterValidator(_check_deployment_name)] = Field(
        "fedtail-scheduled", max_length=200, description="Prefect deployment name."
    )
    cron: Annotated[list[str], BeforeValidator(_one_or_list), AfterValidator(_check_cron)] = Field(
        default_factory=lambda: ["0 3 * * *"],
        min_length=1,
        description="Cron expressions (Prefect's syntax), one schedule each; a single string is one entry.",
    )


class EvaluationConfig(_Section):
    """Server-side evaluation: how classes are grouped for head / medium / tail accuracy."""

    many_shot: int = Field(
        100, ge=0, le=10**9, description="Head classes have more than this many training samples (OLTR: 100)."
    )
    few_shot: int = Field(
        20, ge=0, le=10**9, description="Tail classes have fewer than this many training samples (OLTR: 20)."
    )

    adjustment: AdjustmentName = Field(
        "none",
        description="Evaluation-time adjustment of the global model (posthoc_la, tau_norm); its metrics "
        "are reported beside the plain ones as adjusted_*. none: only the plain ones.",
    )
    options: _plugin_options(ADJUSTMENTS, "adjustment") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Adjustment options, as its `Options` declares."
    )

    @model_validator(mode="after")
    def _ordered(self) -> EvaluationConfig:
        if self.few_shot > self.many_shot:
            raise ValueError(
                f"evaluation.few_shot={self.few_shot} must not exceed evaluation.many_shot={self.many_shot}"
            )
        return self


class SemisupConfig(_Section):
    """Semi-supervised local updates: how each client's unlabeled part (``partition.labeled_fraction``
    < 1) enters training. Off (``none``, supervised-only) by default."""

    method: SemisupName = Field(
        "none",
        description="Registered semi-supervised method (fixmatch, flexmatch, ...); none: the labeled part "
        "only (supervised-only); all_labels: the unlabeled part with its true labels (the upper bound).",
    )
    options: _plugin_options(SEMISUP, "method") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Method options, as its `Options` declares."
    )
    mu: int = Field(
        7,
        ge=1,
        le=1000,
        description="Unlabeled samples per labeled one in each local batch (FixMatch's mu): the unlabeled "
        "batch is mu x train.batch_size.",
    )
    weak: AugmentationName = Field(
        "auto", description="Registered weak augmentation; auto: the dataset's (`fedtail list datasets`)."
    )
    weak_options: dict[str, Any] = Field(
        default_factory=dict, description="Weak augmentation options, as its `Options` declares."
    )
    strong: AugmentationName = Field(
        "auto", description="Registered strong augmentation; auto: the dataset's."
    )
    strong_options: dict[str, Any] = Field(
        default_factory=dict, description="Strong augmentation options, as its `Options` declares."
    )
    warmup_rounds: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Global rounds at the start of the run that train on the labeled part only (a "
        "supervised warm-up before pseudo-labels count, as Arazo et al. warm up for 10 epochs).",
    )
    count_unlabeled: bool = Field(
        True,
        description="FedAvg weights count each client's unlabeled samples beside its labeled ones when the "
        "method trains on them (a client with no labels still contributes); false: labeled samples only.",
    )


class FedtailConfig(_Section):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    semisup: SemisupConfig = Field(default_factory=SemisupConfig)
    crt: CrtConfig = Field(default_factory=CrtConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> FedtailConfig:
        spec = DATASETS.get(self.dataset.name)
        kept = self.dataset.classes
        if kept is not None:
            allowed = f"2 or more distinct class ids in 0..{spec.num_classes - 1}"
            if (
                len(kept) < 2
                or len(set(kept)) != len(kept)
                or not all(0 <= c < spec.num_classes for c in kept)
            ):
                raise ValueError(f"dataset.classes={kept} for {self.dataset.name!r}; allowed: {allowed}")
        self.task_sizes  # noqa: B018 - raises, naming the tasks.* field, if the classes cannot be cut so
        n_train = spec.train_size(self.dataset)
        if self.federation.num_clients > n_train:
            raise ValueError(
                f"federation.num_clients={self.federation.num_clients} exceeds the {n_train} training "
                f"samples of {self.dataset.name!r}; allowed: 1..{n_train}"
            )
        need = self.partition.min_partition_size * self.federation.num_clients
        if self.partition.method == "dirichlet" and need > n_train:
            raise ValueError(
                f"partition.min_partition_size={self.partition.min_partition_size} x federation.num_clients="
                f"{self.federation.num_clients} exceeds the {n_train} training samples of "
                f"{self.dataset.name!r}; allowed: at most {n_train // self.federation.num_clients}"
            )
        if self.federation.min_train_clients > self.federation.num_clients:
            raise ValueError(
                f"federation.min_train_clients={self.federation.min_train_clients} exceeds "
                f"federation.num_clients={self.federation.num_clients}"
            )
        if self.model.depth is not None and self.model_name() != "mlp":
            raise ValueError(
                f"model.depth={self.model.depth} sets the mlp's hidden layers, but the model is "
                f"{self.model_name()!r}; remove model.depth or set model.name=mlp"
            )
        if self.attack.name != "none" and round(self.attack.fraction * self.federation.num_clients) == 0:
            raise ValueError(
                f"attack.name={self.attack.name!r} with attack.fraction={self.attack.fraction} of "
                f"federation.num_clients={self.federation.num_clients} makes no client an attacker: raise "
                "attack.fraction, or set attack.name=none"
            )
        pc = self.partition
        novel = pc.novel_classes or []
        distinct = len(set(novel)) == len(novel) and all(0 <= c < self.num_classes for c in novel)
        if not distinct or len(novel) >= self.num_classes:
            raise ValueError(
                f"partition.novel_classes={novel}; allowed: distinct class ids in 0..{self.num_classes - 1}, "
                "fewer than all classes"
            )
        if pc.unlabeled_distribution != "rest" and pc.all_labeled:
            raise ValueError(
                f"partition.unlabeled_distribution={pc.unlabeled_distribution!r} shapes the unlabeled part, "
                "but partition.labeled_fraction=1.0 leaves none: set partition.labeled_fraction below 1"
            )
        self._check_semisup(spec)
        for registry, name in (
            (OBJECTIVES, self.train.objective),
            (CONTINUAL, self.continual.method),
            (SEMISUP, self.semisup.method),
            (STRATEGIES, self.strategy.name),
            (ADJUSTMENTS, self.evaluation.adjustment),
        ):
            check = getattr(registry.get(name), "check_config", None)  # a plug-in's combination rules
            problem = check(self) if check is not None else None
            if problem:
                raise ValueError(problem)
        return self

    def _check_semisup(self, spec: Any) -> None:
        """The semi-supervised method's augmentations: ``auto`` resolved to the dataset's pair, each
        checked against the dataset's modality and its options filled (the config's one form)."""
        ss = self.semisup
        method = SEMISUP.get(ss.method)
        if method.uses_unlabeled and self.partition.all_labeled:
            raise ValueError(
                f"semisup.method={ss.method!r} trains on each client's unlabeled part, but "
                "partition.labeled_fraction=1.0 leaves none: set partition.labeled_fraction below 1 "
                "(e.g. 0.1), or semisup.method=none"
            )
        for i, view in enumerate(("weak", "strong")):
            name = getattr(ss, view)
            if view not in method.views:
                continue
            resolved = spec.augmentations[i] if name == "auto" else name
            problem = AUGMENTATIONS.get(resolved).check(spec)
            if problem:
                raise ValueError(f"semisup.{view}={name!r}: {problem}")
            try:
                options = check_options(AUGMENTATIONS, resolved, getattr(ss, f"{view}_options"))
            except ValueError as err:
                raise ValueError(f"semisup.{view}_options: {err}") from None
            if name == "auto":
                object.__setattr__(ss, view, resolved)
            object.__setattr__(ss, f"{view}_options", options)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        kept = self.dataset.classes
        return len(kept) if kept is not None else DATASETS.get(self.dataset.name).num_classes

    @property
    def task_sizes(self) -> list[int]:
        """Classes introduced by each task (`fedtail.tasks.task_sizes`)."""
        from fedtail.tasks import task_sizes

        t = self.tasks
        return task_sizes(self.num_classes, t.classes_per_task, t.first_task_classes, t.sizes)

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def participation(self) -> np.ndarray | None:
        """Clients x tasks: who takes part in which task (`fedtail.tasks.client_participation`); None
        when every client takes part in every task."""
        from fedtail.tasks import client_participation

        t = self.tasks
        if not (t.late_join_fraction or t.skip_fraction):
            return None
        return client_participation(
            self.federation.num_clients, self.num_tasks, t.late_join_fraction, t.skip_fraction, self.seed
        )

    @property
    def task_rounds(self) -> int:
        """Rounds each task takes: the federated rounds, then the cRT stage's."""
        return self.federation.rounds_per_task + self.crt.rounds

    def model_name(self) -> str:
        return DATASETS.get(self.dataset.name).default_model if self.model.name == "auto" else self.model.name

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of the whole config, or of the named sections (cache keys, run ids)."""
        data = _without_off_sections(_with_data_revision(self.model_dump(mode="json")))
        if sections:
            sections = tuple(s for s in sections if s.split(".")[0] in data)
            data = {s: _get_dotted(data, s) for s in sections}
        return _digest(data)

    def experiment_fingerprint(self) -> str:
        """Hash of what shapes the results: everything but where outputs go, the engine, the schedule.

        (The engines give identical results, so a run may resume on another one.)
        """
        return self.fingerprint(*_EXPERIMENT_SECTIONS)

    def legacy_experiment_fingerprints(self) -> set[str]:
        """The experiment fingerprints fedtail before canonical options (up to c40e41b) may have given
        this config: it hashed plug-in options left out of a config as ``{}`` and options written out
        with their defaults filled in, so a plug-in at its defaults hashed either way, and it had none
        of the `ADDED_FIELDS` (a config holding their old behaviour hashes without them). Checkpoints
        and sweep run folders of those versions are still recognised through these."""
        dump = _without_off_sections(_with_data_revision(self.model_dump(mode="json")))
        data = {s: dump[s] for s in _EXPERIMENT_SECTIONS if s in dump}
        for key, before in ADDED_FIELDS.items():
            section, name = key.rsplit(".", 1)
            if _get_dotted(data, section).get(name) == before:
                del _get_dotted(data, section)[name]
        at_defaults = [
            (section, registry)
            for section, (registry, name_field) in _OPTIONS_OF.items()
            if section in data
            and data[section]["options"]
            and data[section]["options"] == check_options(registry, data[section][name_field], {})
        ]
        found = set()
        for emptied in itertools.product((False, True), repeat=len(at_defaults)):
            variant = json.loads(json.dumps(data))
            for (section, _), empty in zip(at_defaults, emptied, strict=True):
                if empty:
                    variant[section]["options"] = {}
            found.add(_digest(variant))
        return found

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


ADDED_FIELDS: dict[str, Any] = {
    "train.keep_optimizer_state": False,
    "model.depth": None,
    "train.max_grad_norm": None,
}
"""Experiment fields added since c40e41b, each with the value that behaves as fedtail did before it
existed. Adding a field to the config changes every fingerprint; listing it here keeps the runs of older
versions resumable (`FedtailConfig.legacy_experiment_fingerprints`)."""

OFF_SECTIONS: dict[str, tuple[str, Any]] = {"attack": ("name", "none"), "semisup": ("method", "none")}
"""Sections added since c40e41b whose off state (the field's value given) behaves as fedtail did before
them: a config with the section off hashes without it, so every fingerprint of such configs (cache keys,
run ids, checkpoints) is what it was."""


OFF_FIELDS: dict[str, Any] = {
    "partition.unlabeled_distribution": "rest",
    "partition.unlabeled_imbalance_factor": None,
    "partition.novel_classes": None,
}
"""Fields added to an existing section whose off value behaves as fedtail did before them: at that
value they are left out of every hash (cache keys, run ids, checkpoints), which so stay what they were."""


def _without_off_sections(data: dict[str, Any]) -> dict[str, Any]:
    for section, (name, off) in OFF_SECTIONS.items():
        if section in data and data[section].get(name) == off:
            data = {k: v for k, v in data.items() if k != section}
    for key, off in OFF_FIELDS.items():
        section, name = key.rsplit(".", 1)
        if section in data and name in data[section] and data[section][name] == off:
            data = {**data, section: {k: v for k, v in data[section].items() if k != name}}
    return data


_EXPERIMENT_SECTIONS = tuple(k for k in FedtailConfig.model_fields if k not in ("output", "engine", "serve"))
_OPTIONS_OF: dict[str, tuple[Registry, str]] = {
    "partition": (PARTITIONERS, "method"),
    "strategy": (STRATEGIES, "name"),
    "train": (OBJECTIVES, "objective"),
    "continual": (CONTINUAL, "method"),
    "evaluation": (ADJUSTMENTS, "adjustment"),
    "attack": (ATTACKS, "name"),
    "semisup": (SEMISUP, "method"),
}
"""Each section with plug-in options: the registry and the field naming the plug-in."""


def with_data_revision(section: dict[str, Any]) -> dict[str, Any]:
    """A dumped dataset section with its `DatasetSpec.revision` added when it is not 0 (so the keys of
    datasets never revised stay what they were): what fingerprints and staged-cache keys hash."""
    revision = DATASETS.get(section["name"]).revision
    return {**section, "revision": revision} if revision else section


def _with_data_revision(dump: dict[str, Any]) -> dict[str, Any]:
    return {**dump, "dataset": with_data_revision(dump["dataset"])}


def _digest(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---- loading -------------------------------------------------------------------------------------
def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key!r}")
        node = child
    node[parts[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key (or section) is an error, not "last one wins",
    aliases (``*name``) are refused (a few lines of them expand to gigabytes), and ``1e-4`` is a float
    as in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a fedtail config; write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # unhashable key: SafeLoader's own error follows
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first.line + 1}, column {first.column + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> Python, or a ConfigError naming ``where``, the line and column and what is wrong."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(x for x in (err.problem, err.context and f"({err.context})") if x)
        raise ConfigError(f"{where}{at}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ConfigError(f"{where}: {key!r} is not a dotted field name like partition.alpha")
    return key


def parse_override(item: str) -> tuple[str, Any]:
    """``'partition.alpha=0.1'`` -> ``('partition.alpha', 0.1)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    where = f"override {item!r}"
    if not sep or not key.strip():
        raise ConfigError(f"{where}: expected KEY=VALUE, e.g. partition.alpha=0.1")
    return _check_key(key.strip(), where), _parse_yaml(raw, f"{where}, value") if raw.strip() else None


def parse_override_list(text: str) -> dict[str, Any]:
    """Space-separated ``KEY=VALUE`` items, shell-quoted where a value has spaces (Flower's ``set``)."""
    try:
        items = shlex.split(text)
    except ValueError as err:
        raise ConfigError(
            f"overrides {text!r}: {err}; separate KEY=VALUE items by spaces, quote values"
        ) from None
    return dict(parse_override(item) for item in items)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Apply dotted-key overrides (a mapping, or ``KEY=VALUE`` strings) to a nested dict copy."""
    out = json.loads(json.dumps(data))
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        _set_dotted(out, _check_key(key, f"override {key!r}"), value)
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if loc == "config" or msg.startswith(loc):  # the message names its field(s) itself
            lines.append(f"  {msg}")
            continue
        got = e.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        quiet = isinstance(got, dict | list) or shown in msg
        lines.append(f"  {loc}: {msg}" + ("" if quiet else f" (got {shown})"))
    return "invalid fedtail config:\n" + "\n".join(lines)


def build_config(data: Mapping[str, Any], *, schedule: bool = True) -> FedtailConfig:
    """Validate a nested dict into a `FedtailConfig`, raising `ConfigError` with readable messages.

    ``schedule=False`` skips checking ``serve`` with Prefect's own rules (about a second to import),
    for processes that re-read a config already checked where it was loaded and never schedule.
    """
    try:
        return FedtailConfig.model_validate(dict(data), context={"schedule": schedule})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(
    path: str | Path | None = DEFAULT_CONFIG_FILE,
    overrides: Mapping[str, Any] | Iterable[str] = (),
    *,
    schedule: bool = True,
) -> FedtailConfig:
    """Read YAML (``None`` = built-in defaults), apply overrides, validate (``schedule``: `build_config`)."""
    data: dict[str, Any] = {} if path is None else read_config_file(path)
    return build_config(apply_overrides(data, overrides), schedule=schedule)


MAX_FILE_BYTES = 2**20
"""Config and sweep files are refused past this size, unread: one of hundreds of MB took minutes to parse."""


def read_small_text(p: Path, where: str) -> str:
    """The UTF-8 text of ``p``, read no further than `MAX_FILE_BYTES`: a larger file (or an endless one
    such as /dev/zero) is refused unread, and bytes that are not UTF-8 are named by line and column."""
    with p.open("rb") as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        size = p.stat().st_size
        raise ConfigError(
            f"{where} is {f'{size / 2**20:.0f} MiB' if size else 'endless'}, over the limit of "
            f"{MAX_FILE_BYTES // 2**20} MiB for a YAML file of fedtail: is it the right file?"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{where}, line {line}, column {column}: not UTF-8 text (byte {raw[err.start]:#04x}); "
            "save the file as UTF-8"
        ) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a ConfigError naming the file (and line) and the problem.

    An empty file (or one of only comments) is refused: it is more often a truncated or wrong file than a
    wish for defaults, which ``{}`` states explicitly.
    """
    p = Path(path)
    where = f"config file {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{where} is a directory; give a YAML file, e.g. --config params.yaml")
    try:
        text = read_small_text(p, where)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror}") from None
    loaded = _parse_yaml(text, where)
    if loaded is None:
        raise ConfigError(f"{where} is empty; write {{}} to mean all defaults")
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{where}: top level must be a mapping of sections (e.g. 'partition: {{alpha: 0.1}}'), "
            f"got a {type(loaded).__name__}"
        )
    return loaded


def to_run_config(cfg: FedtailConfig) -> dict[str, bool | float | int | str]:
    """Flatten to Flower run-config (scalars only; lists/dicts/None travel as JSON strings)."""
    flat: dict[str, bool | float | int | str] = {}
    for key, value in cfg.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            flat[name] = v if isinstance(v, bool | int | float | str) else "json:" + json.dumps(v)
    return flat


def _from_run_config_value(key: str, value: Any) -> Any:
    if not (isinstance(value, str) and value.startswith("json:")):
        return value
    try:
        return json.loads(value[5:])
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"run-config {key!r}: {value!r} is not valid JSON after 'json:' "
            f"(column {err.colno + 5}: {err.msg})"
        ) from None


def from_run_config(run_config: Mapping[str, Any], root: Path | None = None) -> FedtailConfig:
    """Inverse of `to_run_config`, also accepting a base file under the key ``config-file``.

    ``flwr run . --run-config "partition.alpha=0.1"`` lands here as ``{"partition.alpha": 0.1}``.
    """
    items = dict(run_config)
    base = items.pop("config-file", None)
    decoded = {k: _from_run_config_value(k, v) for k, v in items.items()}
    if base:
        path = Path(str(base))
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        return load_config(path, decoded)
    return build_config(apply_overrides({}, decoded))


# ---- checks that need the filesystem (run by the CLI, the flow and the ServerApp before any work) -----
def check_paths(cfg: FedtailConfig, root: str | Path = ".") -> None:
    """Refuse output folders that are files or cannot be created, and a torchvision dataset that would
    have to be materialized without ``dataset.root``. Reads the filesystem, creates nothing."""
    from fedtail.io import under

    root = Path(root)
    problems = []
    for field in ("data_dir", "artifacts_dir", "runs_dir", "sweeps_dir"):
        value = getattr(cfg.output, field)
        problem = _folder_problem(under(root, value))
        if problem:
            problems.append(f"output.{field}={value!r}: {problem}")
    data_dir = under(root, cfg.output.data_dir).resolve()
    if not problems and data_dir == root.resolve():
        problems.append(
            f"output.data_dir={cfg.output.data_dir!r} is the project root; use a subfolder (data)"
        )
    if not problems and not data_dir.is_relative_to(root.resolve()):
        problems.append(
            f"output.data_dir={cfg.output.data_dir!r} must lie inside the project {str(root)!r}: "
            "DVC versions it from there"
        )
    if not problems:
        problems += _raw_data_problem(cfg, root)
    if problems:
        raise ConfigError("invalid fedtail config:\n" + "\n".join(f"  {p}" for p in problems))


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or later created) as an output folder; None if it can."""
    if path.exists():
        if not path.is_dir():
            return f"{str(path)!r} exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{str(path)!r} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {str(path)!r}: {str(parent)!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(path)!r}: {str(parent)!r} is not writable"
    return None


def _raw_data_problem(cfg: FedtailConfig, root: Path) -> list[str]:
    """A torchvision dataset needs ``dataset.root`` unless its raw files are in ``data_dir/<name>/`` or
    recorded in ``data.dvc`` (then DVC restores them); the other datasets build their own raw data."""
    from fedtail import staging
    from fedtail.datasets.torchvision_sets import SPECS

    name = cfg.dataset.name
    if name not in SPECS or cfg.dataset.root is not None:
        return []
    if staging.raw_present(cfg, root) or not staging.unversioned(cfg, root):
        return []
    raw = Path(cfg.output.data_dir) / name
    return [
        f"dataset.root: dataset {name!r} must be read from torchvision files ({str(raw)!r} is not there "
        f"and {staging.dvc_file_of(cfg, root).name} does not record it), but dataset.root is not set; set "
        "dataset.root to the torchvision folder (with dataset.download: true to download into it)"
    ]
