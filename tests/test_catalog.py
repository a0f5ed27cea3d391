"""`fedtail list`, `--version` and `--help`: what is available, read from the registries."""

from __future__ import annotations

import pytest

from fedtail.catalog import KINDS, entries, paper_of, render
from fedtail.cli import main
from fedtail.registry import CONTINUAL, PluginOptions


def test_every_registered_plugin_is_listed_with_its_paper_and_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, (registry, field) in KINDS.items():
        assert f"{kind} ({field})" in out
        for name in registry.names():
            assert f"\n  {name} " in out, (kind, name)
    icarl = next(e for e in entries(CONTINUAL) if e.name == "icarl")
    assert icarl.paper.startswith('Rebuffi et al., "iCaRL') and icarl.paper.endswith("CVPR 2017")
    assert icarl.options == "memory_size: int = 200, selection: Literal['herding', 'random'] = 'herding'"
    assert all(e.summary and len(e.summary) <= 110 for kind in KINDS for e in entries(KINDS[kind][0]))


def test_a_new_plugin_appears_by_itself() -> None:
    class DepthOptions(PluginOptions):
        depth: int = 3

    @CONTINUAL.register("zz-test-method")
    class Method:
        """A test method (Doe et al., "A Title", NeurIPS 2031): forgets nothing. More text."""

        Options = DepthOptions

    try:
        text = render(["continual"])
        assert "zz-test-method" in text
        entry = next(e for e in entries(CONTINUAL) if e.name == "zz-test-method")
        assert entry.options == "depth: int = 3"
    finally:
        CONTINUAL._items.pop("zz-test-method")


def test_paper_of_takes_the_first_citation() -> None:
    assert paper_of('X (Li & Hoiem, "LwF", ECCV 2016) and (Other 2020)') == 'Li & Hoiem, "LwF", ECCV 2016'
    assert paper_of("no citation here (none)") == ""


def test_one_kind_and_a_bad_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "engines"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("engines (engine.name)") and "continual" not in out
    with pytest.raises(SystemExit) as exc:
        main(["list", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_version_and_help_with_examples_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("fedtail ")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "fedtail list continual" in out
    assert "configs/smoke.yaml" in out and "presets (--config):" in out
