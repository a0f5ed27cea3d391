"""``fedtail`` command line: the whole pipeline (through Prefect), a scheduled deployment, and one
command per DVC stage. Every command takes ``--config`` (YAML, default ``params.yaml``) and repeated
``--set key=value`` overrides onto the one typed config."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from fedtail import io
from fedtail.config import DEFAULT_CONFIG_FILE, ConfigError, FedtailConfig, load_config, parse_override

log = logging.getLogger("fedtail")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _common(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show Flower's own log lines (engine.verbose=true)"
    )


def _run_id_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--run-id", required=required, help="run folder name under output.runs_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtail",
        description="Federated and continual learning on imbalanced data "
        "(DVC data -> Prefect flow -> Flower federation -> report).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        return p

    p = command(
        "run", "the whole pipeline as a Prefect flow (verify data, stage, partition, simulate, report)"
    )
    _run_id_arg(p)
    p.add_argument("--resume", metavar="RUN_ID", help="continue a crashed run from its last checkpoint")
    command("serve", "serve the pipeline as a Prefect deployment on the config's cron schedule(s)")
    p = command("stage", "DVC stage 1: verify data/ against data.dvc, write normalised arrays")
    p.add_argument(
        "--expect-data",
        metavar="MD5",
        help="fail unless data.dvc records this version (dvc.yaml passes it, so a new data version reruns)",
    )
    command("partition", "DVC stage 2: long tail, non-IID client split, task schedule")
    p = command("simulate", "DVC stage 3: run the Flower federation on the configured engine")
    _run_id_arg(p)
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    p = command("report", "DVC stage 4: plots and report.md for a finished run")
    _run_id_arg(p, required=True)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """``--set`` items (and ``--run-id``) as dotted-key overrides onto the config."""
    overrides = dict(parse_override(o) for o in args.overrides)
    if getattr(args, "run_id", None):
        overrides["output.run_id"] = args.run_id
    return overrides


def _config(args: argparse.Namespace) -> FedtailConfig:
    return load_config(args.config, _overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    if args.verbose:
        args.overrides.append("engine.verbose=true")
    root = Path(args.root)
    try:
        if args.command == "run" and args.resume:
            runs_dir = _config(args).output.runs_dir  # where the crashed run lives, overrides included
            args.config = str(io.under(root, runs_dir) / args.resume / "config.yaml")
            args.run_id = args.resume
        cfg = _config(args)
    except ConfigError as err:
        print(f"fedtail: {err}", file=sys.stderr)
        return 2

    from fedtail import pipeline

    if args.command == "run":
        from fedtail.prefect_server import temporary_server
        from flows.pipeline import fl_pipeline

        if not args.run_id:
            args.run_id = pipeline.new_run_dir(cfg, root).name
        log.setLevel(logging.WARNING)  # the flow's run logger prints the per-round progress
        try:
            with temporary_server():
                run_dir = fl_pipeline(config_path=args.config, overrides=_overrides(args), root=str(root))
        except KeyboardInterrupt:
            started = (io.under(root, cfg.output.runs_dir) / args.run_id / "config.yaml").is_file()
            hint = f"resume with: fedtail run --resume {args.run_id}" if started else "nothing to resume yet"
            print(f"\nfedtail: interrupted; {hint}", file=sys.stderr)
            return 130
        print(f"report: {Path(run_dir) / 'report.md'}")
    elif args.command == "serve":
        from flows.serve import serve

        serve(args.config, _overrides(args), root=str(root))
    elif args.command == "stage":
        from fedtail.staging import data_md5

        recorded = data_md5(root, cfg.output.data_dir)
        if args.expect_data and args.expect_data.removesuffix(".dir") != recorded:
            print(
                f"fedtail: data.dvc records {recorded or 'nothing'}, expected {args.expect_data}",
                file=sys.stderr,
            )
            return 2
        print(pipeline.stage(cfg, root))
    elif args.command == "partition":
        print(pipeline.partition(cfg, pipeline.stage(cfg, root), root))
    elif args.command == "simulate":
        staged = pipeline.stage(cfg, root)
        parts = pipeline.partition(cfg, staged, root)
        run_dir = pipeline.new_run_dir(cfg, root)
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        pipeline.simulate(cfg, staged, parts, run_dir)
        print(run_dir)
    elif args.command == "report":
        print(pipeline.report(pipeline.new_run_dir(cfg, root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
