"""The one typed configuration of fedtail.

`FedtailConfig` is the single source of truth. YAML files (``params.yaml`` is the default, ``configs/``
holds presets), CLI ``--set a.b=v`` overrides, Prefect flow parameters and Flower run-config entries
(flat dotted keys) all map onto it through `load_config` / `apply_overrides`. Every value is checked
before any work starts; errors name the field and the allowed values.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedtail.registry import (
    CONTINUAL,
    DATASETS,
    ENGINES,
    MODELS,
    OBJECTIVES,
    PARTITIONERS,
    STRATEGIES,
    Registry,
)

DEFAULT_CONFIG_FILE = "params.yaml"


class ConfigError(ValueError):
    """Invalid configuration: the message names each bad field and what it allows."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known(registry: Registry, value: str) -> str:
    value = value.lower()
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {value!r}; known: {', '.join(registry.names())}")
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


class DatasetConfig(_Section):
    """Which raw data to use and how to split it into train/test."""

    name: DatasetName = Field("digits", description="Registered dataset name.")
    root: str | None = Field(None, description="Local torchvision root for mnist/fashion-mnist/cifar.")
    download: bool = Field(False, description="Allow torchvision to download into `root`.")
    num_samples: int = Field(4000, ge=100, le=200_000, description="mnist1d: samples generated (fixed seed).")
    test_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="Held-out share for datasets without a test split."
    )


class PartitionConfig(_Section):
    """Global long-tail profile, then a non-IID split over clients."""

    method: PartitionerName = Field("dirichlet", description="Registered partitioner: iid, dirichlet.")
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration; smaller = more label skew.")
    min_partition_size: int = Field(
        5, ge=0, description="Dirichlet: resample until every client holds at least this many."
    )
    imbalance_factor: float = Field(
        10.0, ge=1.0, description="Long tail n_max / n_min over classes (1 = keep data balanced)."
    )
    labeled_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of each client's samples that keep their label."
    )


class TasksConfig(_Section):
    """Class-incremental schedule. ``classes_per_task = null`` means one task with all classes."""

    classes_per_task: int | None = Field(2, ge=1, description="Classes introduced by each task.")
    shuffle_classes: bool = Field(True, description="Seeded shuffle of the class order.")


class FederationConfig(_Section):
    num_clients: int = Field(10, ge=1, le=100_000)
    rounds_per_task: int = Field(4, ge=1, le=100_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="Share of clients sampled per round.")
    min_train_clients: int = Field(1, ge=1, description="Lower bound on clients sampled per round.")


class StrategyConfig(_Section):
    name: StrategyName = Field("fedavg", description="Registered server strategy.")
    options: dict[str, Any] = Field(default_factory=dict, description="Strategy-specific options.")


class TrainConfig(_Section):
    """Local training on each client."""

    objective: ObjectiveName = Field("ce", description="Registered local objective.")
    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    options: dict[str, Any] = Field(default_factory=dict, description="Objective-specific options.")


class ContinualConfig(_Section):
    method: ContinualName = Field("finetune", description="Registered continual-learning method.")
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Section):
    name: str = Field("auto", description="Registered model, or 'auto' to pick by dataset.")
    hidden: int = Field(128, ge=1, le=65_536, description="Hidden width of the MLP / CNN head.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v.lower() if v.lower() == "auto" else _known(MODELS, v)


class EngineConfig(_Section):
    """Where the ClientApps run. The ServerApp and ClientApp are the same on every engine."""

    name: EngineName = Field("inprocess", description="Registered engine: inprocess, ray.")
    workers: int = Field(1, ge=1, le=256, description="inprocess: parallel client processes (1 = none).")
    cpus_per_client: float = Field(1.0, gt=0.0, description="ray: CPUs reserved per ClientApp.")
    threads_per_client: int = Field(1, ge=1, le=256, description="torch threads inside a ClientApp.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout: float = Field(
        3600.0,
        gt=0.0,
        description="Seconds before a client counts as failed. inprocess: the limit of each ClientApp call "
        "(clients run one after another; a call over it is abandoned, its process killed with workers > 1); "
        "ray: how long the server waits for a round's replies (Flower's round timeout).",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="ray: null = start a private local Ray listening on 127.0.0.1 only; an address "
        "('auto', 'ray://head:10001') = join that running cluster instead.",
    )
    verbose: bool = Field(False, description="Show Flower's own INFO log lines (strategy banners, rounds).")


class OutputConfig(_Section):
    data_dir: str = "data"
    artifacts_dir: str = "artifacts"
    runs_dir: str = "runs"
    run_id: str | None = Field(None, description="Fixed run id; default is time + config hash.")


class ServeConfig(_Section):
    """`fedtail serve`: the Prefect deployment and its schedules."""

    name: str = "fedtail-scheduled"
    cron: list[str] = Field(default_factory=lambda: ["0 3 * * *"])


class FedtailConfig(_Section):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> FedtailConfig:
        spec = DATASETS.get(self.dataset.name)
        n_classes = spec.num_classes
        cpt = self.tasks.classes_per_task
        if cpt is not None and (cpt > n_classes or n_classes % cpt):
            divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ValueError(
                f"tasks.classes_per_task={cpt} must divide the {n_classes} classes of "
                f"{self.dataset.name!r}; allowed: {divisors} or null (one task)"
            )
        n_train = spec.train_size(self.dataset)
        if self.federation.num_clients > n_train:
            raise ValueError(
                f"federation.num_clients={self.federation.num_clients} exceeds the {n_train} training "
                f"samples of {self.dataset.name!r}; allowed: 1..{n_train}"
            )
        if self.federation.min_train_clients > self.federation.num_clients:
            raise ValueError(
                f"federation.min_train_clients={self.federation.min_train_clients} exceeds "
                f"federation.num_clients={self.federation.num_clients}"
            )
        return self

    # ---- derived views -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return DATASETS.get(self.dataset.name).num_classes

    @property
    def num_tasks(self) -> int:
        cpt = self.tasks.classes_per_task
        return 1 if cpt is None else self.num_classes // cpt

    def model_name(self) -> str:
        return DATASETS.get(self.dataset.name).default_model if self.model.name == "auto" else self.model.name

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of the whole config, or of the named sections (cache keys, run ids)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: _get_dotted(data, s) for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def experiment_fingerprint(self) -> str:
        """Hash of what shapes the results: everything but where outputs go, the engine, the schedule.

        (The engines give identical results, so a run may resume on another one.)
        """
        sections = [k for k in type(self).model_fields if k not in ("output", "engine", "serve")]
        return self.fingerprint(*sections)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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


def parse_override(item: str) -> tuple[str, Any]:
    """``'partition.alpha=0.1'`` -> ``('partition.alpha', 0.1)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. partition.alpha=0.1")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Apply dotted-key overrides (a mapping, or ``KEY=VALUE`` strings) to a nested dict copy."""
    out = json.loads(json.dumps(data))
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        _set_dotted(out, key, value)
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        suffix = f" (got {got!r})" if loc != "config" and not isinstance(got, dict) else ""
        lines.append(f"  {loc}: {msg}{suffix}")
    return "invalid fedtail config:\n" + "\n".join(lines)


def build_config(data: Mapping[str, Any]) -> FedtailConfig:
    """Validate a nested dict into a `FedtailConfig`, raising `ConfigError` with readable messages."""
    try:
        return FedtailConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(
    path: str | Path | None = DEFAULT_CONFIG_FILE,
    overrides: Mapping[str, Any] | Iterable[str] = (),
) -> FedtailConfig:
    """Read YAML (``None`` = built-in defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
        data = loaded
    return build_config(apply_overrides(data, overrides))


def to_run_config(cfg: FedtailConfig) -> dict[str, bool | float | int | str]:
    """Flatten to Flower run-config (scalars only; lists/dicts/None travel as JSON strings)."""
    flat: dict[str, bool | float | int | str] = {}
    for key, value in cfg.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            flat[name] = v if isinstance(v, bool | int | float | str) else "json:" + json.dumps(v)
    return flat


def from_run_config(run_config: Mapping[str, Any], root: Path | None = None) -> FedtailConfig:
    """Inverse of `to_run_config`, also accepting a base file under the key ``config-file``.

    ``flwr run . --run-config "partition.alpha=0.1"`` lands here as ``{"partition.alpha": 0.1}``.
    """
    items = dict(run_config)
    base = items.pop("config-file", None)
    decoded = {
        k: json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v for k, v in items.items()
    }
    if base:
        path = Path(str(base))
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        return load_config(path, decoded)
    return build_config(apply_overrides({}, decoded))
