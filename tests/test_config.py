"""Config: defaults validate, overrides map onto fields, bad values fail early with the field named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from fedtail.config import (
    ConfigError,
    FedtailConfig,
    apply_overrides,
    build_config,
    check_paths,
    check_run_id,
    from_run_config,
    load_config,
    parse_override,
    parse_override_list,
    to_run_config,
)
from fedtail.registry import CONTINUAL, OBJECTIVES, STRATEGIES, PluginOptions

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_and_presets_validate() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.dataset.name == "digits"
    assert cfg.num_tasks == 10 // cfg.tasks.classes_per_task
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(preset)


def test_set_overrides_are_parsed_as_yaml() -> None:
    assert parse_override("partition.alpha=0.1") == ("partition.alpha", 0.1)
    assert parse_override("tasks.classes_per_task=null") == ("tasks.classes_per_task", None)
    cfg = load_config(ROOT / "params.yaml", ["partition.alpha=0.1", "tasks.classes_per_task=null"])
    assert cfg.partition.alpha == 0.1 and cfg.num_tasks == 1


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ({"partition.alpha": 0}, "partition.alpha", "greater than 0"),
        ({"partition.alpha": -1.0}, "partition.alpha", "greater than 0"),
        ({"federation.num_clients": 5000}, "num_clients", "allowed: 1.."),
        ({"tasks.classes_per_task": 3}, "tasks.classes_per_task", "[1, 2, 5, 10]"),
        ({"strategy.name": "fedmagic"}, "strategy.name", "known: bulyan, creff, fedadagrad, fedadam, fedavg"),
        ({"train.objective": "nope"}, "train.objective", "known: balanced_softmax, ce, class_"),
        ({"continual.method": "nope"}, "continual.method", "unknown continual method 'nope'; known:"),
        ({"dataset.name": "imagenet"}, "dataset.name", "known: "),
        ({"engine.name": "spark"}, "engine.name", "inprocess"),
        ({"train.lr": 0}, "train.lr", "greater than 0"),
        ({"partition.bogus": 1}, "partition.bogus", "unknown field"),
    ],
)
def test_invalid_values_name_field_and_allowed(override: dict, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(apply_overrides({}, override))
    text = str(err.value)
    assert field in text and hint in text, text


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("partition.alpha")


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("does-not-exist.yaml")


def test_flower_run_config_round_trip() -> None:
    cfg = build_config({"partition": {"alpha": 0.2}, "tasks": {"classes_per_task": None}})
    flat = to_run_config(cfg)
    assert flat["partition.alpha"] == 0.2
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_flower_run_config_file_plus_overrides() -> None:
    cfg = from_run_config({"config-file": "params.yaml", "partition.alpha": 0.05}, root=ROOT)
    assert cfg.partition.alpha == 0.05
    assert cfg.federation.num_clients == load_config(ROOT / "params.yaml").federation.num_clients


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = FedtailConfig(), FedtailConfig()
    assert a.fingerprint() == b.fingerprint()
    c = build_config({"seed": 1})
    assert a.fingerprint() != c.fingerprint()
    assert a.fingerprint("dataset") == c.fingerprint("dataset")


# ---- every value checked before any work (issue 5) -------------------------------------------------
def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(apply_overrides({}, data))
    return str(err.value)


def _float_fields(model: type = FedtailConfig, prefix: str = "") -> list[str]:
    """Every float field of the config, found from the model (so a new one is covered too)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif ann is float or float in getattr(ann, "__args__", ()):
            out.append(prefix + name)
    return out


def test_float_fields_are_found() -> None:
    assert {"partition.alpha", "engine.timeout", "engine.cpus_per_client", "train.lr"} <= set(_float_fields())


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", _float_fields())
def test_non_finite_floats_are_refused_everywhere(field: str, value: float) -> None:
    text = _error({field: value})
    assert field in text and "finite number" in text, text


def test_non_finite_from_yaml_and_set(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("partition:\n  alpha: .inf\n")
    with pytest.raises(ConfigError, match=r"partition.alpha: Input should be a finite number"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"train.lr: Input should be a finite number"):
        load_config(ROOT / "params.yaml", dict([parse_override("train.lr=.nan")]))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"seed": True}, "seed"),
        ({"federation.num_clients": True}, "federation.num_clients"),
        ({"train.epochs": "3"}, "train.epochs"),
        ({"seed": 2.0}, "seed"),
        ({"train.lr": True}, "train.lr"),
        ({"engine.verbose": 1}, "engine.verbose"),
    ],
)
def test_no_silent_type_coercion(override: dict, field: str) -> None:
    text = _error(override)
    assert f"{field}: Input should be a valid" in text, text


def test_numbers_in_yaml_and_json_still_work(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  weight_decay: 0\npartition:\n  alpha: 1\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.momentum=5e-1"])
    assert cfg.train.lr == 1e-3 and cfg.train.momentum == 0.5 and cfg.partition.alpha == 1.0
    assert isinstance(cfg.partition.alpha, float)
    assert build_config(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ({"partition.alpha": 1e308}, "partition.alpha", "less than or equal to 1000000"),
        ({"engine.timeout": 1e308}, "engine.timeout", "less than or equal to"),
        ({"engine.cpus_per_client": 1e9}, "engine.cpus_per_client", "less than or equal to 1024"),
        ({"engine.actors": 0}, "engine.actors", "greater than or equal to 1"),
        ({"train.weight_decay": 1e308}, "train.weight_decay", "less than or equal to 1"),
        ({"partition.min_partition_size": 1000}, "partition.min_partition_size=1000", "at most 134"),
        ({"dataset.root": ""}, "dataset.root", "not a usable folder path"),
        ({"output.runs_dir": "a\x00b"}, "output.runs_dir", "not a usable folder path"),
        ({"serve.name": ""}, "serve.name", "not a Prefect deployment name"),
        ({"serve.name": "a/b"}, "serve.name", "not a Prefect deployment name"),
    ],
)
def test_nonsense_values_are_refused(override: dict, field: str, hint: str) -> None:
    text = _error(override)
    assert field in text and hint in text, text


# -- plug-in options
class _ScaledCE:
    """A test objective declaring options, registered only for the test."""

    class Options(PluginOptions):
        scale: float = Field(1.0, gt=0.0)
        mode: Literal["sum", "mean"] = "mean"
        warmup: int = 0


@pytest.fixture
def scaled_ce(monkeypatch: pytest.MonkeyPatch) -> None:
    OBJECTIVES.names()  # load the real plug-ins first
    monkeypatch.setitem(OBJECTIVES._items, "scaled-ce", _ScaledCE)


def test_plugin_options_are_checked_and_typed(scaled_ce: None) -> None:
    cfg = build_config({"train": {"objective": "scaled-ce", "options": {"scale": 2}}})
    assert cfg.train.options == {"scale": 2.0, "mode": "mean", "warmup": 0}  # typed, defaults filled
    assert isinstance(cfg.train.options["scale"], float)
    assert from_run_config(to_run_config(cfg)) == cfg


def test_plugin_options_unknown_name_lists_the_accepted(scaled_ce: None) -> None:
    text = _error({"train.objective": "scaled-ce", "train.options": {"scael": 2.0}})
    assert "train.options: unknown option 'scael'" in text, text
    assert "scale: float = 1.0, mode: Literal['sum', 'mean'] = 'mean', warmup: int = 0" in text, text


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ({"scale": "big"}, "option 'scale': Input should be a valid number"),
        ({"scale": math.inf}, "option 'scale': Input should be a finite number"),
        ({"scale": -1.0}, "option 'scale': Input should be greater than 0"),
        ({"warmup": True}, "option 'warmup': Input should be a valid integer"),
        ({"mode": "max"}, "option 'mode': Input should be 'sum' or 'mean'"),
    ],
)
def test_plugin_options_wrong_type_refused(scaled_ce: None, options: dict, hint: str) -> None:
    text = _error({"train.objective": "scaled-ce", "train.options": options})
    assert hint in text and "accepts: scale: float" in text, text


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        (
            {"strategy.options": {"foo": 1}},
            "strategy.options: unknown option 'foo'; strategy 'fedavg' accepts: none",
        ),
        (
            {"train.options": {"mu": 0.1}},
            "train.options: unknown option 'mu'; local objective 'ce' accepts: none",
        ),
        ({"train.options.mu": 0.1}, "train.options: unknown option 'mu'"),
        (
            {"continual.options": {"memory": 200}},
            "continual.options: unknown option 'memory'; continual method 'finetune' accepts: none",
        ),
    ],
)
def test_registered_plugins_declare_their_options(override: dict, hint: str) -> None:
    assert hint in _error(override)


def test_every_registered_plugin_declares_options() -> None:
    for registry in (STRATEGIES, OBJECTIVES, CONTINUAL):
        for name in registry.names():
            assert "Options" in vars(registry.get(name)), f"{registry.kind} {name!r} declares no Options"


# -- environment
def test_cuda_device_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = _error({"engine.device": "cuda"})
    assert "engine.device='cuda' but torch.cuda.is_available() is False; allowed here: auto, cpu" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_config({"engine": {"device": "cuda"}}).engine.device == "cuda"


@pytest.mark.parametrize("field", ["data_dir", "artifacts_dir", "runs_dir"])
def test_output_folders_that_are_files_are_refused(tmp_path: Path, field: str) -> None:
    (tmp_path / "afile").write_text("x")
    for value, hint in (("afile", "exists and is not a folder"), ("afile/sub", "is a file")):
        cfg = build_config({"output": {field: value}})
        with pytest.raises(ConfigError, match=f"output.{field}='{value}': .*{hint}"):
            check_paths(cfg, tmp_path)
    check_paths(build_config({"output": {field: "new/deeper"}}), tmp_path)  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing created


def test_data_dir_must_not_be_the_project_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.data_dir='.' is the project root"):
        check_paths(build_config({"output": {"data_dir": "."}}), tmp_path)


def test_torchvision_dataset_without_root_or_data_is_refused(tmp_path: Path) -> None:
    from fedtail.datasets.torchvision_sets import RAW_FILES

    cfg = build_config({"dataset": {"name": "mnist"}})
    with pytest.raises(ConfigError, match="dataset.root: dataset 'mnist' must be read from torchvision"):
        check_paths(cfg, tmp_path)
    check_paths(build_config({"dataset": {"name": "mnist", "root": "tv"}}), tmp_path)
    for name in RAW_FILES:  # already materialized: no root needed
        (tmp_path / "data" / "mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "mnist" / name).write_bytes(b"")
    check_paths(cfg, tmp_path)


# -- run id
@pytest.mark.parametrize(
    "name", ["..", ".", "", "/etc", "a/b", "a\\b", "-x", "a\tb", "a\nb", "x" * 101, "caf\u00e9", " a"]
)
def test_run_id_is_a_plain_name(name: str) -> None:
    with pytest.raises(ValueError, match="run id .* is not allowed: use a name of letters, digits"):
        check_run_id(name)
    assert "output.run_id: run id" in _error({"output.run_id": name})


@pytest.mark.parametrize("name", ["run-1", "2026-11-23T05.00.00_ab12", "a" * 100, "A.b_c-d"])
def test_run_id_good_names(name: str) -> None:
    assert check_run_id(name) == name
    assert build_config({"output": {"run_id": name}}).output.run_id == name


# -- files and overrides
@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("seed: 0\ntrain:\n  lr: [1,\n", r"line 4, column 1: invalid YAML"),
        (
            "seed: 0\ntrain:\n  lr: 0.1\n  lr: 0.2\n",
            r"line 4, column 3: invalid YAML: duplicate key 'lr' \(first on line 3",
        ),
        (
            "train:\n  lr: 0.1\ntrain:\n  epochs: 1\n",
            r"line 3, column 1: invalid YAML: duplicate key 'train'",
        ),
        ("seed:\t0\n", r"line 1, column 6: invalid YAML"),
        ("- a\n- b\n", r"top level must be a mapping of sections .* got a list"),
        ("", r"is empty; write \{\} to mean all defaults"),
        ("# only a comment\n", r"is empty"),
        (
            "a: &x [1, 2]\nb: [*x, *x]\n",
            r"line 2, column 5: invalid YAML: aliases \(\*name\) are not allowed",
        ),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"invalid YAML: nested too deeply"),
    ],
)
def test_bad_config_files_name_file_and_line(tmp_path: Path, text: str, hint: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{path}'.*{hint}"):
        load_config(path)


def test_empty_mapping_means_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("{}\n")
    assert load_config(tmp_path / "c.yaml") == FedtailConfig()


def test_non_utf8_and_directory_config(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes("seed: 0\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 2, column 6: not UTF-8 text \(byte 0xe9\)"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("item", "hint"),
    [
        ("train.lr=[1,", r"override 'train.lr=\[1,', value, line 1, column 4: invalid YAML"),
        ("train.options={a: 1, a: 2}", r"duplicate key 'a'"),
        ("=3", "expected KEY=VALUE"),
        ("train", "expected KEY=VALUE"),
        ("partition..alpha=1", "is not a dotted field name"),
        ("partition alpha=1", "is not a dotted field name"),
    ],
)
def test_bad_overrides_name_the_override(item: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        parse_override(item)


def test_bad_flower_run_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="run-config 'serve.cron': .* is not valid JSON"):
        from_run_config({"serve.cron": "json:[1,"})
    with pytest.raises(ConfigError, match="is not a dotted field name"):
        from_run_config({"partition..alpha": 0.1})


# -- schedules
def test_cron_uses_prefects_parser_and_shows_the_list_syntax() -> None:
    text = _error({"serve.cron": ["0 3 * * *", "61 * * * *"]})
    assert "serve.cron: '61 * * * *' is not a valid cron expression (minute 61: out of range)" in text, text
    assert 'write a list: cron: ["0 3 * * *", "30 12 * * 1-5"]' in text
    assert "is not a valid cron expression" in _error({"serve.cron": ["* * *"]})
    assert "at least 1 item" in _error({"serve.cron": []})


def test_cron_single_string_is_one_entry() -> None:
    assert build_config({"serve": {"cron": "30 12 * * 1-5"}}).serve.cron == ["30 12 * * 1-5"]


def test_flower_set_list_is_shell_quoted() -> None:
    """``flwr run --run-config "set='...'"``: values with spaces are quoted, errors name the override."""
    got = parse_override_list("""partition.alpha=0.1 serve.cron='["0 3 * * *", "30 12 * * 1-5"]'""")
    assert got == {"partition.alpha": 0.1, "serve.cron": ["0 3 * * *", "30 12 * * 1-5"]}
    with pytest.raises(ConfigError, match="No closing quotation"):
        parse_override_list("serve.name='a b")
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,'"):
        parse_override_list("train.lr=[1,")


def test_client_side_rereading_skips_the_schedule_check() -> None:
    """A ClientApp re-validating a shipped config must not import Prefect just for ``serve.cron``."""
    import subprocess
    import sys

    code = (
        "import sys; from fedtail.config import FedtailConfig; from fedtail.protocol import Job; "
        "from pathlib import Path; "
        "Job.from_json(Job(FedtailConfig(), Path('s'), Path('p')).to_json()); "
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    with pytest.raises(ConfigError, match="not a valid cron"):
        build_config({"serve": {"cron": ["61 * * * *"]}})


def test_torchvision_dataset_recorded_in_data_dvc_needs_no_root(tmp_path: Path) -> None:
    """data/mnist absent but recorded in data.dvc: DVC restores it, so no dataset.root is needed."""
    from fedtail.datasets.torchvision_sets import RAW_FILES

    entry = "- md5: {}\n  path: data/{}\n"
    (tmp_path / "data.dvc").write_text("outs:\n" + entry.format("ab" * 16, "digits/images.npy"))
    cfg = build_config({"dataset": {"name": "mnist"}})
    with pytest.raises(ConfigError, match="dataset 'mnist' must be read from torchvision"):
        check_paths(cfg, tmp_path)  # data.dvc exists but does not hold mnist
    mnist = "".join(entry.format("cd" * 16, f"mnist/{name}") for name in RAW_FILES)
    (tmp_path / "data.dvc").write_text("outs:\n" + mnist)
    check_paths(cfg, tmp_path)


def test_plugins_read_their_options_typed(scaled_ce: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One mechanism for all three kinds: objectives and continual methods get ``self.options``; a
    strategy's options become its Flower constructor's keywords."""
    from types import SimpleNamespace

    from clients.continual import ContinualMethod
    from clients.objectives import LocalObjective
    from strategies.fedavg import FedAvgStrategy

    class Objective(LocalObjective):
        Options = _ScaledCE.Options

    class Replay(ContinualMethod):
        class Options(PluginOptions):
            memory: int = Field(100, ge=0)

    class Weighted(FedAvgStrategy):
        class Options(PluginOptions):
            weighted_by_key: str = "num-examples"

    CONTINUAL.names()
    STRATEGIES.names()
    monkeypatch.setitem(CONTINUAL._items, "replay-test", Replay)
    monkeypatch.setitem(STRATEGIES._items, "weighted-test", Weighted)
    cfg = build_config(
        {
            "train": {"objective": "scaled-ce", "options": {"scale": 3}},
            "continual": {"method": "replay-test", "options": {"memory": 20}},
            "strategy": {"name": "weighted-test", "options": {"weighted_by_key": "n"}},
        }
    )
    ctx = SimpleNamespace(job=SimpleNamespace(config=cfg))
    assert Objective(ctx).options == _ScaledCE.Options(scale=3.0)  # type: ignore[arg-type]
    assert Replay(ctx).options.memory == 20  # type: ignore[arg-type]
    strategy = Weighted.from_config(cfg, {i: i for i in range(cfg.federation.num_clients)})
    assert strategy.weighted_by_key == "n"
    assert "continual.options: option 'memory': Input should be greater than or equal to 0" in _error(
        {"continual.method": "replay-test", "continual.options.memory": -1}
    )


def test_schedule_false_validates_without_importing_prefect() -> None:
    """``schedule=False`` (processes that re-read a checked config) skips Prefect's import (~1.5 s);
    the default checks ``serve`` with Prefect's own rules, as every CLI command does."""
    import subprocess
    import sys

    code = (
        "import sys; from fedtail.config import load_config; "
        "load_config('params.yaml', schedule={}); print('prefect' in sys.modules)"
    )
    for schedule, imported in ((False, "False"), (True, "True")):
        cmd = [sys.executable, "-c", code.format(schedule)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == imported
