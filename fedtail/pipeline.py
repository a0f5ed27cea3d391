"""The four pipeline steps as plain functions: stage -> partition -> simulate -> report.

The CLI (one step per DVC stage), the Prefect flow (``flows/``) and ``flwr run`` all call these; none of
them holds logic of its own. Outputs are content-addressed (stage, partition) or per run id (simulate,
report), and every file is written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fedtail import io, runs
from fedtail import staging as _staging
from fedtail.config import FedtailConfig
from fedtail.partition import partition_labels, partition_problems, write_manifest, write_partition
from fedtail.protocol import Job
from fedtail.registry import ENGINES
from fedtail.tasks import schedule_from_config

CLIENT_APP = "clients.app:app"
log = logging.getLogger(__name__)


def cache_key_stage(cfg: FedtailConfig, root: Path = Path(".")) -> str:
    """The dataset's data version (its md5s in data.dvc) + dataset parameters: what the staged arrays
    depend on."""
    return f"stage-{_staging.data_md5(cfg, root)}-{cfg.fingerprint('dataset')}"


def stage(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """Check/restore the DVC-versioned raw data and write normalised train/test arrays."""
    return _staging.stage(cfg, Path(root))


def cache_key_partition(cfg: FedtailConfig, staged_dir: Path) -> str:
    meta = _staging.staged_meta(staged_dir)
    return (
        "partition-"
        + cfg.fingerprint("seed", "partition", "tasks", "federation.num_clients")
        + "-"
        + str(meta.get("data_md5", ""))[:12]
        + "-"
        + Path(staged_dir).name
    )


def partition(cfg: FedtailConfig, staged_dir: Path, root: Path = Path(".")) -> Path:
    """Long tail + non-IID client split + task schedule; idempotent per cache key.

    An existing folder is reused only if its files match the sha256s in its ``DONE`` manifest; else it is
    written again (it is derived data: nothing is lost).
    """
    out = io.under(root, cfg.output.artifacts_dir) / "partitions" / cache_key_partition(cfg, staged_dir)
    if out.is_dir():
        problems = partition_problems(out)
        if not problems:
            return out
        log.warning("partition folder %s fails its check (%s): writing it again", out, ", ".join(problems))
    splits = _staging.load_staged(staged_dir)
    result = partition_labels(splits.y_train, cfg.num_classes, cfg)
    schedule = schedule_from_config(cfg)
    with io.atomic_dir(out) as tmp:
        write_partition(result, schedule, len(splits.y_train), tmp)
        write_manifest(tmp, staged=Path(staged_dir).name)
    return out


def new_run_dir(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """``<runs_dir>/<run-id>``: ``output.run_id``, else a fresh id (UTC time + config hash + random)."""
    return runs.run_path(io.under(root, cfg.output.runs_dir), cfg.output.run_id or runs.new_run_id(cfg))


class ExpectedWarnings(logging.Filter):
    """Drops Flower's warning that federated evaluation is off: fedtail evaluates the global model on
    the server after every round by design (``fraction_evaluate=0``), so the line only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Federated evaluation will be skipped" not in record.getMessage()


@contextlib.contextmanager
def flower_logs(verbose: bool) -> Iterator[None]:
    """Flower logs every round's full ConfigRecord at INFO; keep it to warnings unless asked.

    Also stop Flower's records from reaching the root logger (Flower prints through its own handler,
    and Prefect's root handler would print each line a second time), drop its warning about federated
    evaluation, and colour its level names only on a terminal: piped into a file or ``dvc exp run``'s
    output they were escape codes.
    """
    logger = logging.getLogger("flwr")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    expected = ExpectedWarnings()
    colours = {}
    for handler in logger.handlers:
        handler.addFilter(expected)
        if hasattr(handler, "colored"):
            colours[handler] = handler.colored
            stream = getattr(handler, "stream", None)
            handler.colored = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
        for handler in logger.handlers:
            handler.removeFilter(expected)
        for handler, colored in colours.items():
            handler.colored = colored


def check_run_target(cfg: FedtailConfig, run_dir: Path, mode: runs.Mode) -> None:
    """Before any work: the run folder suits ``mode``, and a run to resume has a usable checkpoint."""
    runs.check_target(run_dir, mode)
    if mode is runs.Mode.RESUME:
        from server.recorder import read_checkpoint  # torch and Flower: only when there is one to read

        read_checkpoint(run_dir, cfg)


def simulate(
    cfg: FedtailConfig,
    staged_dir: Path,
    partition_dir: Path,
    run_dir: Path,
    on_round: Callable[[dict], None] | None = None,
    mode: runs.Mode = runs.Mode.NEW,
    client_app: str = CLIENT_APP,
) -> Path:
    """Run the federation on the configured engine into ``run_dir``, claimed (locked) for the whole run.

    ``mode`` says what an existing folder means: an error (new), a checkpoint to continue (resume), or a
    fedtail run to replace (overwrite). ``client_app`` is the ClientApp's import path (engines load it
    in their own processes).
    """
    from server.app import build_server_app, write_run_header
    from server.recorder import read_checkpoint

    job = Job(cfg, Path(staged_dir).resolve(), Path(partition_dir).resolve())
    with runs.claim(run_dir, mode) as run_dir:
        read_checkpoint(run_dir, cfg)  # a foreign checkpoint fails here, before anything is written
        if mode is runs.Mode.RESUME and runs.finished(run_dir):
            log.info("run %s finished already; nothing to resume", run_dir.name)
            return run_dir  # its files stay exactly as they are
        write_run_header(job, run_dir)
        start = time.perf_counter()
        server_app = build_server_app(job, run_dir, on_round)
        with flower_logs(cfg.engine.verbose):
            ENGINES.get(cfg.engine.name)(server_app, client_app, cfg)
        if not (run_dir / "metrics.json").is_file():
            raise RuntimeError(f"the federation ended without writing {run_dir / 'metrics.json'}")
        io.write_json(
            run_dir / "timing.json",
            {"engine": cfg.engine.name, "simulate_seconds": time.perf_counter() - start},
        )
    return run_dir


def report(run_dir: Path) -> Path:
    """Plots and ``report.md`` for a finished run; returns the report path."""
    from fedtail.report import write_report

    run_dir = Path(run_dir)
    if not runs.is_run(run_dir):
        raise runs.RunFolderError(f"{run_dir} is not a fedtail run folder (no {runs.MARKER} marker)")
    with runs.lock_run(run_dir):
        return write_report(run_dir)
