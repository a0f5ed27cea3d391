"""One config, one form: plug-in options left out, written as ``{}`` or spelled out with their defaults are
the same config everywhere a config is identified (config.yaml, fingerprints, checkpoints, sweep run
folders, Flower's run-config), for every registered plug-in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from fedtail import pipeline, runs
from fedtail.config import (
    _OPTIONS_OF,
    apply_overrides,
    build_config,
    check_options,
    from_run_config,
    load_config,
    read_config_file,
    to_run_config,
)
from server.recorder import CHECKPOINT, CheckpointError, read_checkpoint
from tests.conftest import crashed_run, smoke_config
from tests.plugins import CASES, REFUSED, SMOKE, Case


def test_every_plugin_has_a_case() -> None:
    assert not REFUSED, f"plug-ins no setting of tests/plugins.py SETTINGS accepts: {REFUSED}"
    assert {c.section for c in CASES} == set(_OPTIONS_OF)


def _spellings(case: Case) -> list[dict]:
    """The case's config with its options left out, written as ``{}``, and written out in full."""
    registry, _ = _OPTIONS_OF[case.section]
    base = apply_overrides(read_config_file(SMOKE), case.overrides)
    defaults = check_options(registry, case.name, {})
    return [
        base,
        apply_overrides(base, {f"{case.section}.options": {}}),
        apply_overrides(base, {f"{case.section}.options": defaults}),
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_options_have_one_form_however_they_are_written(case: Case) -> None:
    configs = [build_config(data) for data in _spellings(case)]
    assert len({c.to_yaml() for c in configs}) == 1
    assert len({c.experiment_fingerprint() for c in configs}) == 1
    assert len({c.fingerprint() for c in configs}) == 1
    cfg = configs[0]
    registry, _ = _OPTIONS_OF[case.section]
    assert getattr(cfg, case.section).options == check_options(registry, case.name, {})
    # what a resume, `flwr run` and a Prefect deployment read back is the same config again
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert from_run_config(to_run_config(cfg)) == cfg


def test_a_crashed_run_with_options_left_out_resumes_from_its_own_config_yaml(project: Path) -> None:
    """The issue's case: `fedtail run --resume` reads the run's config.yaml (options written out) and
    must recognise the checkpoint the run wrote from a config that left them out."""
    cfg = smoke_config(project, **{"continual.method": "replay", "output.run_id": "left-out"})
    run_dir = crashed_run(cfg, project, crash_at=2)
    resumed = load_config(run_dir / "config.yaml")
    pipeline.check_run_target(resumed, run_dir, runs.Mode.RESUME)  # raised CheckpointError before
    staged = pipeline.stage(resumed, project)
    pipeline.simulate(
        resumed, staged, pipeline.partition(resumed, staged, project), run_dir, mode=runs.Mode.RESUME
    )
    assert runs.finished(run_dir)


def _old_fingerprint(cfg) -> str:
    """fedtail up to c40e41b: options left out hashed as ``{}``, over every section but output, engine
    and serve (written out here independently of the code under test)."""
    data = cfg.model_dump(mode="json")
    data = {k: v for k, v in data.items() if k not in ("output", "engine", "serve")}
    data["continual"]["options"] = {}
    del data["train"]["keep_optimizer_state"], data["model"]["depth"]  # added since
    del data["train"]["max_grad_norm"]
    del data["attack"], data["semisup"]  # sections added since, off by default
    for name in ("unlabeled_distribution", "unlabeled_imbalance_factor", "novel_classes"):
        del data["partition"][name]  # fields added since, hashed only when on
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _unrevised(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The dataset as it was at c40e41b (revision 0)."""
    import dataclasses

    from fedtail.registry import DATASETS

    monkeypatch.setitem(DATASETS._items, name, dataclasses.replace(DATASETS.get(name), revision=0))


def test_checkpoints_of_the_old_fingerprint_still_resume_and_foreign_ones_do_not(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = smoke_config(project, **{"continual.method": "replay", "output.run_id": "old-format"})
    run_dir = crashed_run(cfg, project, crash_at=2)
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    state["config_fingerprint"] = _old_fingerprint(cfg)
    torch.save(state, run_dir / CHECKPOINT)
    with pytest.raises(CheckpointError, match="default that changed"):  # clipping is on by default now
        read_checkpoint(run_dir, load_config(run_dir / "config.yaml"))
    unclipped = load_config(run_dir / "config.yaml", {"train.max_grad_norm": None})
    with pytest.raises(CheckpointError, match="revised dataset"):  # digits are standardised now
        read_checkpoint(run_dir, unclipped)
    _unrevised(monkeypatch, "digits")
    assert read_checkpoint(run_dir, unclipped) is not None
    other = smoke_config(project, **{"continual.method": "replay", "continual.options.memory_size": 300})
    assert other.legacy_experiment_fingerprints().isdisjoint(cfg.legacy_experiment_fingerprints())
    with pytest.raises(CheckpointError, match="written with a different config"):
        read_checkpoint(run_dir, other)


def test_legacy_fingerprints_only_relax_options_at_their_defaults() -> None:
    changed = build_config({"continual": {"method": "replay", "options": {"memory_size": 300}}})
    (old,) = changed.legacy_experiment_fingerprints()  # options not at their defaults: one form
    assert old != changed.experiment_fingerprint()  # keep_optimizer_state came after
    default = build_config({"continual": {"method": "replay"}, "train": {"objective": "focal"}})
    assert len(default.legacy_experiment_fingerprints()) == 4  # continual and train options, each either way


def test_every_added_field_is_listed_with_the_value_that_behaves_as_before() -> None:
    """A field added to an experiment section must be in ADDED_FIELDS, or every older run stops resuming:
    the sections' fields as of c40e41b are written out here."""
    from fedtail.config import ADDED_FIELDS, OFF_FIELDS, OFF_SECTIONS, FedtailConfig

    data = FedtailConfig().model_dump(mode="json")
    current = {  # a section added whole is off by default, and hashed only when on (OFF_SECTIONS)
        f"{s}.{k}" for s in data if isinstance(data[s], dict) and s not in OFF_SECTIONS for k in data[s]
    }
    added = (
        current
        - {f"{s}.{k}" for s, names in FIELDS_AT_C40E41B.items() for k in names}
        - {f for f in current if f.startswith(("output.", "engine.", "serve."))}
    )
    assert added == set(ADDED_FIELDS) | set(OFF_FIELDS)  # an off field is hashed only when on
    for key, off in OFF_FIELDS.items():
        section, name = key.split(".")
        assert FedtailConfig.model_fields[section].default_factory().__dict__[name] == off
    plain = FedtailConfig()
    on = build_config({"partition": {"unlabeled_distribution": "uniform", "labeled_fraction": 0.5}})
    assert plain.fingerprint("partition") != on.fingerprint("partition")
    assert "unlabeled_distribution" not in json.dumps(_hashed(plain))
    for key, before in ADDED_FIELDS.items():
        section, name = key.split(".")
        default = FedtailConfig.model_fields[section].default_factory().__dict__[name]
        assert default == before or key in CHANGED_BEHAVIOUR, f"{key}: a new default changes results"
        build_config({section: {name: before}})  # the old behaviour can still be asked for


def _hashed(cfg) -> dict:
    from fedtail.config import _with_data_revision, _without_off_sections

    return _without_off_sections(_with_data_revision(cfg.model_dump(mode="json")))


CHANGED_BEHAVIOUR = {"train.max_grad_norm"}
"""Added fields whose default is not the old behaviour, on purpose (issue 18): runs before them do not
resume, since this version would not reproduce them."""


def test_a_changed_default_leaves_its_old_value_resumable_only_when_asked_for() -> None:
    default = build_config({})
    assert default.train.max_grad_norm == 3.0
    old = build_config({"train": {"max_grad_norm": None}})
    assert old.experiment_fingerprint() != default.experiment_fingerprint()
    assert default.legacy_experiment_fingerprints().isdisjoint(old.legacy_experiment_fingerprints())


FIELDS_AT_C40E41B = {
    "dataset": ("name", "root", "download", "num_samples", "test_fraction", "classes"),
    "partition": (
        "method",
        "alpha",
        "min_partition_size",
        "options",
        "imbalance_factor",
        "profile",
        "step_fraction",
        "labeled_fraction",
        "labeled_imbalance_factor",
    ),
    "tasks": (
        "classes_per_task",
        "first_task_classes",
        "sizes",
        "shuffle_classes",
        "blurry",
        "late_join_fraction",
        "skip_fraction",
    ),
    "federation": ("num_clients", "rounds_per_task", "fraction_train", "min_train_clients"),
    "strategy": ("name", "options"),
    "train": (
        "objective",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "sampler",
        "oversample",
        "smote_k",
        "options",
    ),
    "crt": ("rounds", "epochs", "lr", "reinit"),
    "continual": ("method", "options"),
    "model": ("name", "hidden", "classifier", "cosine_scale"),
    "evaluation": ("many_shot", "few_shot", "adjustment", "options"),
}
