"""``fedtail`` command line: the whole pipeline (through Prefect), a scheduled deployment, and one
command per DVC stage. Every command takes ``--config`` (YAML, default ``params.yaml``) and repeated
``--set key=value`` overrides onto the one typed config."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from fedtail import io, runs
from fedtail.config import (
    DEFAULT_CONFIG_FILE,
    ConfigError,
    FedtailConfig,
    check_paths,
    load_config,
    parse_override,
)
from fedtail.errors import EnvironmentProblem, RunError, describe_write_error, is_write_error
from fedtail.staging import DataIntegrityError, check_versioned

log = logging.getLogger("fedtail")


class _Stdout(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at each record, not as it was when the CLI started (callers such
    as test runners and notebooks swap it, and a handler bound to a closed stream fails on every line)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _setup_logging() -> None:
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _common(p: argparse.ArgumentParser, federation: bool) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG_FILE, help="YAML config (default: %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set partition.alpha=0.1 (repeatable)",
    )
    p.add_argument("--root", default=".", help="project root holding data/, data.dvc (default: .)")
    if federation:  # only the commands that run Flower have its log lines to show
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show Flower's own log lines (engine.verbose=true)",
        )


def _run_id_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--run-id", required=required, help="run folder name under output.runs_dir")


def _existing_run_args(p: argparse.ArgumentParser, resume_takes_id: bool) -> None:
    """``--resume`` / ``--overwrite``: without one of them an existing run folder is refused."""
    group = p.add_mutually_exclusive_group()
    if resume_takes_id:
        group.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run from its checkpoint")
    else:
        group.add_argument("--resume", action="store_true", help="continue --run-id from its last checkpoint")
    group.add_argument(
        "--overwrite", action="store_true", help="replace an existing run folder (only one fedtail created)"
    )


def _mode(args: argparse.Namespace) -> runs.Mode:
    return runs.Mode.from_flags(bool(getattr(args, "resume", None)), getattr(args, "overwrite", False))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtail")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _epilog() -> str:
    """Examples and the presets in ``configs/`` with the first line of their comment."""
    lines = [
        "examples:",
        "  fedtail run                                  the default experiment (params.yaml) on digits",
        "  fedtail run --set continual.method=icarl --set partition.alpha=0.1",
        "  fedtail run --config configs/smoke.yaml      a preset (below)",
        "  fedtail run --resume RUN_ID                  continue an interrupted run",
        "  fedtail sweep benchmarks/sweeps/cil-digits-fed.yaml",
        "  fedtail list continual                       the continual methods, their papers and options",
    ]
    presets = sorted(Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    if presets:
        lines += ["", "presets (--config):"]
        for path in presets:
            first = next(
                (ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
            )
            lines.append(f"  {str(path):<28} {first}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtail",
        description="Federated and continual learning on imbalanced data "
        "(DVC data -> Prefect flow -> Flower federation -> report).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedtail {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    from fedtail.catalog import KINDS

    p = sub.add_parser(
        "list",
        help="what is available: datasets, partitioners, models, objectives, strategies, continual "
        "methods, adjustments, engines (one line each, paper, options with defaults)",
        description="Every registered plug-in with a one-line description, the paper it implements and "
        "its options with defaults; read from the registries.",
    )
    p.add_argument("kind", nargs="?", choices=[*KINDS, "all"], default="all", help="one kind (default: all)")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        _common(p, federation=name in ("run", "serve", "simulate", "sweep"))
        return p

    p = command(
        "run", "the whole pipeline as a Prefect flow (verify data, stage, partition, simulate, report)"
    )
    _run_id_arg(p)
    _existing_run_args(p, resume_takes_id=True)
    command("serve", "serve the pipeline as a Prefect deployment on the config's cron schedule(s)")
    command("stage", "DVC stage 1: verify the dataset's files in data/ against data.dvc, write arrays")
    command("partition", "DVC stage 2: long tail, non-IID client split, task schedule")
    p = command("simulate", "DVC stage 3: run the Flower federation on the configured engine")
    _run_id_arg(p)
    _existing_run_args(p, resume_takes_id=False)
    p = command("report", "DVC stage 4: plots and report.md for a finished run")
    _run_id_arg(p, required=True)
    p = command(
        "sweep",
        "run (or continue) an experiment grid: axes x variants x seeds from a sweep file, in parallel; "
        "writes <output.sweeps_dir>/<sweep-id>/ (runs.csv, summary.csv/.md, plot.png)",
    )
    p.add_argument("sweep_file", nargs="?", help="sweep YAML, e.g. benchmarks/sweeps/skew.yaml")
    p.add_argument("--workers", type=int, help="runs at a time (default: the file's workers)")
    p.add_argument("--sweep-id", help="sweep folder name (default: the file's name without .yaml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--show", metavar="SWEEP_ID", help="print the summary table of a sweep and exit")
    mode.add_argument(
        "--serve",
        action="store_true",
        help="serve the sweep as a Prefect deployment on the sweep file's serve.cron schedule(s)",
    )
    p = command(
        "data",
        "version a dataset: 'data add DATASET' materializes its raw files (dataset.* from --config/--set) "
        "and records them in data.dvc; the only command that changes data.dvc",
    )
    p.add_argument("action", choices=["add"], help="add: record (or re-record) the dataset's raw files")
    p.add_argument("dataset", help="dataset name, e.g. digits or mnist1d")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """``--set`` items (and ``--run-id``) as dotted-key overrides onto the config."""
    overrides = dict(parse_override(o) for o in args.overrides)
    if getattr(args, "dataset", None):
        overrides["dataset.name"] = args.dataset
    if getattr(args, "run_id", None):
        overrides["output.run_id"] = args.run_id
    return overrides


def _config(args: argparse.Namespace) -> FedtailConfig:
    return load_config(args.config, _overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        from fedtail.catalog import KINDS, render

        print(render(list(KINDS) if args.kind == "all" else [args.kind]), end="")
        return 0
    _setup_logging()
    if getattr(args, "verbose", False):
        args.overrides.append("engine.verbose=true")
    root = Path(args.root)
    if (
        args.command in ("run", "simulate", "sweep")
        and not getattr(args, "show", None)
        and sys.stderr.isatty()
    ):
        # within a second on a terminal: validating the config imports every plug-in (seconds)
        what = args.sweep_file if args.command == "sweep" else args.config
        extra = f" with {len(args.overrides)} override(s)" if args.overrides else ""
        print(f"fedtail {args.command}: checking {what}{extra} and the data…", file=sys.stderr, flush=True)
    from fedtail import pipeline

    try:
        if args.command == "run" and args.resume:
            # the crashed run's own config.yaml, found where the overrides say runs live
            run_dir = runs.run_path(io.under(root, _config(args).output.runs_dir), args.resume)
            if not (run_dir / "config.yaml").is_file():
                raise runs.RunFolderError(f"cannot resume {args.resume!r}: no config.yaml in {run_dir}")
            args.config = str(run_dir / "config.yaml")
            args.run_id = args.resume
        cfg = _config(args)
        check_paths(cfg, root)
        if args.command in ("run", "simulate"):
            if args.resume and not cfg.output.run_id:
                raise runs.RunFolderError("--resume needs --run-id RUN_ID: the run to continue")
            if not cfg.output.run_id:
                args.run_id = runs.new_run_id(cfg)  # known up front, so an interrupted run can say its id
                cfg = _config(args)
            run_dir = pipeline.new_run_dir(cfg, root)
            print(
                f"run {run_dir.name}: {run_dir}", flush=True
            )  # before the target checks and the run's imports
            pipeline.check_run_target(cfg, run_dir, _mode(args))
            if _mode(args) is runs.Mode.RESUME and runs.finished(run_dir):
                return _resume_finished(run_dir)
        if args.command in ("run", "serve", "stage", "partition", "simulate"):
            check_versioned(cfg, root)
        if args.command == "sweep":
            check_sweep_args(args, root)
    except ConfigError as err:
        print(f"fedtail: {err}", file=sys.stderr)
        return 2
    except (DataIntegrityError, EnvironmentProblem) as err:
        print(f"fedtail: {err}", file=sys.stderr)
        return 1
    try:
        return _dispatch(args, cfg, root)
    except ConfigError as err:  # run folders and checkpoints found unusable once work began
        print(f"fedtail: {err}", file=sys.stderr)
        return 2
    except (DataIntegrityError, EnvironmentProblem) as err:  # data not as recorded; Prefect unusable
        print(f"fedtail: {err}", file=sys.stderr)
        return 1
    except RunError as err:  # e.g. every client diverged: the same config would only diverge again
        print(f"fedtail: {err}; change that setting and start again (--overwrite)", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a file-size limit, a read-only folder: what to do next
        if not is_write_error(err):
            raise
        then = _after_write_error(args, cfg, root)
        print(f"fedtail: {describe_write_error(err)}, then {then}", file=sys.stderr)
        return 1


def _again(args: argparse.Namespace, cfg: FedtailConfig) -> str:
    """The flags another command needs to find this run's folder: ``--root`` and ``output.runs_dir``
    where they are not the defaults (they come from --config/--set, which the other command lacks)."""
    flags = f" --root {args.root}" if args.root != "." else ""
    if cfg.output.runs_dir != type(cfg.output)().runs_dir:
        flags += f" --set output.runs_dir={cfg.output.runs_dir}"
    return flags


def _run_hint(args: argparse.Namespace, cfg: FedtailConfig, run_dir: Path) -> str:
    """How to go on with a run that stopped early: write its report (training done), resume it (it has
    begun), or nothing yet."""
    run_id = run_dir.name
    if runs.finished(run_dir):
        again = f"fedtail report --run-id {run_id}{_again(args, cfg)}"
        return f"write its report (the training is complete) with: {again}"
    if not (run_dir / "config.yaml").is_file():
        return "nothing to resume yet"
    if args.command == "run":
        return f"resume with: fedtail run --resume {run_id}{_again(args, cfg)}"
    return f"resume with: fedtail simulate --run-id {run_id} --resume (with the same --config/--set)"


def _after_write_error(args: argparse.Namespace, cfg: FedtailConfig, root: Path) -> str:
    """What to run once the disk (or limit, or permission) is fixed; nothing fedtail writes is left
    half-written, so each command can simply be run again."""
    from fedtail import pipeline

    if args.command in ("run", "simulate"):
        hint = _run_hint(args, cfg, pipeline.new_run_dir(cfg, root))
        return "run again" if hint == "nothing to resume yet" else hint
    if args.command == "report":
        return f"run fedtail report --run-id {args.run_id}{_again(args, cfg)} again"
    if args.command == "sweep" and not args.show:
        return "run the same command again to continue the sweep"
    return "run the command again"


def _resume_finished(run_dir: Path) -> int:
    """``--resume`` of a run that ended: nothing to train; only a report it lacks is written."""
    from fedtail import pipeline

    report = run_dir / "report.md"
    if report.is_file():
        print(f"fedtail: run {run_dir.name} finished already; nothing to resume (report: {report})")
    else:
        print(f"fedtail: run {run_dir.name} finished already; writing its missing report")
        print(f"report: {pipeline.report(run_dir)}")
    return 0


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler, a container stop) stops a run the way Ctrl-C does: checkpoint kept,
    the flow run marked, the temporary server stopped, the resume command printed."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _import_flow() -> None:
    """What the run needs besides the server (Prefect's flow machinery, torch, Flower): imported while
    the temporary server starts, instead of after it."""
    import flows.pipeline  # noqa: F401


def _train(args: argparse.Namespace, cfg: FedtailConfig, root: Path) -> str:
    """``run`` (the Prefect flow; returns the report line) or ``simulate`` (the DVC stage; the run folder)."""
    from fedtail import pipeline

    if args.command == "simulate":
        from fedtail.progress import RoundProgress

        staged = pipeline.stage(cfg, root)
        parts = pipeline.partition(cfg, staged, root)
        run_dir = pipeline.new_run_dir(cfg, root)
        with RoundProgress(cfg.num_tasks * cfg.task_rounds, cfg.num_tasks, cfg.task_rounds) as bar:
            return str(pipeline.simulate(cfg, staged, parts, run_dir, on_round=bar.update, mode=_mode(args)))
    from fedtail.prefect_server import temporary_server

    log.setLevel(logging.WARNING)  # the flow's run logger prints the per-round progress
    with temporary_server(while_starting=_import_flow):
        from flows.pipeline import fl_pipeline

        run_dir = fl_pipeline(
            config_path=args.config,
            overrides=_overrides(args),
            root=str(root),
            resume=bool(args.resume),
            overwrite=args.overwrite,
        )
    return f"report: {Path(run_dir) / 'report.md'}"


def _dispatch(args: argparse.Namespace, cfg: FedtailConfig, root: Path) -> int:
    from fedtail import pipeline

    if args.command in ("run", "simulate"):
        run_dir = pipeline.new_run_dir(cfg, root)  # the id from --run-id, --set or generated by main
        try:
            with _sigterm_interrupts():
                print(_train(args, cfg, root))
        except KeyboardInterrupt:
            print(f"\nfedtail: interrupted; {_run_hint(args, cfg, run_dir)}", file=sys.stderr)
            return 130
    elif args.command == "serve":
        from flows.serve import serve

        serve(args.config, _overrides(args), root=str(root))
    elif args.command == "stage":
        print(pipeline.stage(cfg, root))
    elif args.command == "partition":
        print(pipeline.partition(cfg, pipeline.stage(cfg, root), root))
    elif args.command == "report":
        print(pipeline.report(pipeline.new_run_dir(cfg, root)))
    elif args.command == "sweep":
        return _sweep(args, cfg, root)
    elif args.command == "data":
        from fedtail.staging import add_data, dvc_file_of

        paths, changed = add_data(cfg, root)
        dvc_file = os.path.relpath(dvc_file_of(cfg, root), root)
        if changed:
            print(f"recorded {cfg.dataset.name} ({', '.join(paths)}) in {dvc_file}; commit it:")
            print(f"  git add {dvc_file} .gitignore && git commit -m 'data: version {cfg.dataset.name}'")
        else:
            print(
                f"{cfg.dataset.name} ({', '.join(paths)}) is already versioned in {dvc_file}; nothing to do"
            )
    return 0


def _sweep_id(args: argparse.Namespace) -> str:
    from fedtail.config import check_run_id

    name = args.sweep_id or Path(args.sweep_file).stem
    try:
        return check_run_id(name)
    except ValueError as err:
        raise ConfigError(f"--sweep-id {name!r}: {err}") from None


def check_sweep_args(args: argparse.Namespace, root: Path) -> None:
    """Before any work: a sweep file or --show, a usable worker count, every cell a valid config."""
    if args.show:
        return
    if not args.sweep_file:
        raise ConfigError(
            "fedtail sweep needs a sweep file (e.g. benchmarks/sweeps/skew.yaml) or --show SWEEP_ID"
        )
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise ConfigError(f"--workers {args.workers}: allowed 1..64")
    from fedtail.sweep import load_sweep
    from flows.sweep import prepare

    spec = load_sweep(args.sweep_file)
    if args.overrides:
        spec = spec.model_copy(update={"set": {**spec.set, **_overrides(args)}})
    prepare(spec, _sweep_id(args), root)


def _sweep(args: argparse.Namespace, cfg: FedtailConfig, root: Path) -> int:
    from fedtail.io import under

    if args.show:
        path = under(root, cfg.output.sweeps_dir) / args.show / "summary.md"
        if not path.is_file():
            raise ConfigError(f"no sweep {args.show!r}: {path} does not exist")
        print(path.read_text(), end="")
        return 0
    sweep_id = _sweep_id(args)
    if args.serve:
        from flows.serve import serve_sweep

        serve_sweep(str(Path(args.sweep_file).resolve()), sweep_id, _overrides(args), str(root), args.workers)
        return 0
    from fedtail.prefect_server import temporary_server
    from flows.sweep import fl_sweep

    try:
        with _sigterm_interrupts(), temporary_server():
            sweep_dir = fl_sweep(
                sweep_path=str(Path(args.sweep_file).resolve()),
                sweep_id=sweep_id,
                root=str(root),
                workers=args.workers,
                overrides=_overrides(args),
                progress=sys.stderr.isatty(),
            )
    except KeyboardInterrupt:
        print(
            f"\nfedtail: interrupted; run the same command again to continue sweep {sweep_id}",
            file=sys.stderr,
        )
        return 130
    print((Path(sweep_dir) / "summary.md").read_text(), end="")
    print(f"sweep {sweep_id}: {sweep_dir}")
    return 0


def entry() -> None:
    """The ``fedtail`` console script: `main`, then a prompt exit. Tearing down the interpreter after a
    run (torch, Prefect's and Flower's modules and threads) took 3 s after the last line was printed;
    everything fedtail writes is closed and atomic by then, so after the exit handlers (Prefect's and
    logging's flushes) the process ends at once."""
    import atexit

    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C in a command that has nothing to resume (report, stage, list...)
        print("\nfedtail: interrupted; files are written whole or not at all: run it again", file=sys.stderr)
        code = 130
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
