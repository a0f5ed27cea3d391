"""Benchmark: `partition_labels` before and after vectorising it (issue: partitioners), side by side in one
invocation on the same labels and configs.

The "old" side is a verbatim copy (below) of the per-client / per-class loops that were replaced: the
Dirichlet draw that ``np.split`` each class and concatenates per client, the labeled split's per-client
``np.unique`` + ``rng.choice`` loop, and the per-client ``bincount`` of the counts. The long tail is the
same function on both sides. Before timing, both sides' outputs are compared: the same clients always,
the same labeled masks when ``labeled_fraction == 1``, the same labeled count per client and class
otherwise (the new masks for ``labeled_fraction < 1`` are drawn differently, by design).

Also timed: a Dirichlet configuration that cannot succeed (tiny ``alpha``, large ``min_partition_size``):
the old code tries ``MAX_TRIES`` draws before failing, the new one gives up after a few.

    .venv/bin/python benchmarks/partition_speed.py               # about a minute on 2 cores
    .venv/bin/python benchmarks/partition_speed.py --repeats 1

Writes ``benchmarks/results/partition_speed.json`` and ``partition_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO  # benchmarks/common.py; puts the project on sys.path

from fedtail import io  # noqa: E402
from fedtail.config import FedtailConfig, PartitionConfig, build_config  # noqa: E402
from fedtail.partition import (  # noqa: E402
    _check_labels,
    apply_long_tail,
    client_class_counts,
    partition_labels,
)
from fedtail.partition import dirichlet as new_dirichlet_module  # noqa: E402

NUM_CLASSES = 100
PER_CLASS = 10_000  # 1,000,000 labels
NUM_CLIENTS = 10_000


# ---- the old implementation (copied from fedtail/partition before vectorising) --------------------
def old_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    concentration = np.full(num_clients, alpha, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        shares = rng.dirichlet(concentration)
        cuts = (np.cumsum(shares) * idx.size).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def old_dirichlet(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    n, minimum = labels.size, cfg.min_partition_size
    if num_clients * minimum > n:
        raise ValueError("min_partition_size x num_clients exceeds the samples")
    for _ in range(100):
        parts = old_draw(labels, num_clients, cfg.alpha, rng)
        if min(p.size for p in parts) >= minimum:
            return parts
    raise ValueError("100 Dirichlet draws all left some client short")


def old_client_class_counts(
    labels: np.ndarray, client_indices: list[np.ndarray], num_classes: int
) -> np.ndarray:
    y = _check_labels(labels, num_classes)
    counts = np.zeros((len(client_indices), num_classes), dtype=np.int64)
    for k, idx in enumerate(client_indices):
        counts[k] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def old_split_labeled(
    client_indices: list[np.ndarray], labels: np.ndarray, labeled_fraction: float, rng: np.random.Generator
) -> list[np.ndarray]:
    y = np.asarray(labels)
    masks = []
    for idx in client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        mask = np.zeros(idx.size, dtype=bool)
        if idx.size:
            classes, inverse, sizes = np.unique(y[idx], return_inverse=True, return_counts=True)
            exact = labeled_fraction * sizes
            quota = np.floor(exact).astype(np.int64)
            target = max(1, int(np.floor(labeled_fraction * idx.size + 0.5)))
            extra = target - int(quota.sum())
            if extra > 0:
                quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
            for k in range(classes.size):
                pos = np.flatnonzero(inverse == k)
                mask[rng.choice(pos, size=int(min(quota[k], pos.size)), replace=False)] = True
        masks.append(mask)
    return masks


def old_partition_labels(labels: np.ndarray, num_classes: int, cfg: FedtailConfig) -> dict[str, Any]:
    """The old pipeline for the Dirichlet method (the checks that did not change left out)."""
    y = _check_labels(labels, num_classes)
    pc = cfg.partition
    rng = np.random.default_rng(cfg.seed)
    kept = apply_long_tail(y, num_classes, pc.imbalance_factor, rng, pc.profile, pc.step_fraction)
    local = old_dirichlet(y[kept], cfg.federation.num_clients, pc, rng)
    client_indices = [np.sort(kept[part]) for part in local]
    labeled = old_split_labeled(client_indices, y, pc.labeled_fraction, rng)
    counts = old_client_class_counts(y, client_indices, num_classes)
    return {"client_indices": client_indices, "labeled": labeled, "counts": counts}


# ---- measuring -----------------------------------------------------------------------------------
def _config(labeled_fraction: float, **partition: Any) -> FedtailConfig:
    return build_config(
        {
            "seed": 0,
            "dataset": {"name": "mnist1d", "num_samples": 200_000},  # only so that 10,000 clients validate
            "federation": {"num_clients": partition.pop("num_clients", NUM_CLIENTS)},
            "partition": {
                "method": "dirichlet",
                "alpha": 0.5,
                "min_partition_size": 5,
                "imbalance_factor": 1.0,
                "labeled_fraction": labeled_fraction,
                **partition,
            },
        }
    )


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the last call's result."""
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def _same(old: dict[str, Any], new: Any, labels: np.ndarray, labeled_fraction: float) -> dict[str, bool]:
    """What the old and new outputs share (the masks only when every sample is labeled)."""
    clients = len(old["client_indices"]) == new.num_clients and all(
        np.array_equal(a, b) for a, b in zip(old["client_indices"], new.client_indices, strict=True)
    )
    old_lab = [idx[m] for idx, m in zip(old["client_indices"], old["labeled"], strict=True)]
    new_lab = [idx[m] for idx, m in zip(new.client_indices, new.labeled, strict=True)]
    out = {
        "same_clients": bool(clients),
        "same_counts": bool(np.array_equal(old["counts"], new.counts)),
        "same_labeled_counts": bool(
            np.array_equal(
                client_class_counts(labels, old_lab, NUM_CLASSES),
                client_class_counts(labels, new_lab, NUM_CLASSES),
            )
        ),
    }
    if labeled_fraction == 1.0:
        out["same_masks"] = all(
            np.array_equal(a, b) for a, b in zip(old["labeled"], new.labeled, strict=True)
        )
    return out


def _failing(repeats: int) -> dict[str, Any]:
    """A Dirichlet config that cannot succeed: time until each side raises, and how many draws it took."""
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 10_000))
    pc = PartitionConfig(method="dirichlet", alpha=0.001, min_partition_size=20)
    draws = {"new": 0}
    real_cuts = new_dirichlet_module._cuts

    def counting_cuts(*args: Any) -> np.ndarray:
        draws["new"] += 1
        return real_cuts(*args)

    def run(fn: Callable[..., Any]) -> str:
        try:
            fn(labels, 2000, pc, np.random.default_rng(0))
        except ValueError as err:
            return str(err)
        return "no error"

    old_s, old_msg = _time(lambda: run(old_dirichlet), max(1, repeats // 3))
    new_dirichlet_module._cuts = counting_cuts
    try:
        new_s, new_msg = _time(lambda: run(new_dirichlet_module.dirichlet), repeats)
    finally:
        new_dirichlet_module._cuts = real_cuts
    return {
        "config": "100,000 labels, 10 classes, 2,000 clients, alpha 0.001, min_partition_size 20",
        "old_seconds": old_s,
        "new_seconds": new_s,
        "ratio": old_s / new_s,
        "old_draws": 100,
        "new_draws": draws["new"] // repeats,
        "new_error": new_msg,
        "old_error": old_msg,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "partition_speed"))
    args = parser.parse_args()
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), PER_CLASS))
    result: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "git": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "labels": labels.size,
        "classes": NUM_CLASSES,
        "clients": NUM_CLIENTS,
        "repeats": args.repeats,
        "workloads": {},
    }
    for fraction in (1.0, 0.5):
        cfg = _config(fraction)
        name = f"dirichlet alpha 0.5, labeled_fraction {fraction}"
        old_s, old = _time(lambda cfg=cfg: old_partition_labels(labels, NUM_CLASSES, cfg), args.repeats)
        new_s, new = _time(lambda cfg=cfg: partition_labels(labels, NUM_CLASSES, cfg), args.repeats)
        checks = _same(old, new, labels, fraction)
        result["workloads"][name] = {
            "old_seconds": old_s,
            "new_seconds": new_s,
            "ratio": old_s / new_s,
            **checks,
        }
        print(f"{name}: old {old_s:.2f} s, new {new_s:.2f} s ({old_s / new_s:.1f}x) {checks}", flush=True)
    result["failing_dirichlet"] = _failing(args.repeats)
    f = result["failing_dirichlet"]
    print(f"failing dirichlet: old {f['old_seconds']:.2f} s, new {f['new_seconds']:.3f} s", flush=True)
    out = Path(args.out)
    io.write_json(out.with_suffix(".json"), result)
    io.write_text(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# partition_labels: old loops vs vectorised ({result['git']})",
        "",
        f"{result['machine']}, {result['cpus']} CPUs, Python {result['python']}, numpy {result['numpy']}. "
        f"{result['labels']:,} labels, {result['classes']} classes, {result['clients']:,} clients, "
        f"imbalance_factor 1, min_partition_size 5; median of {result['repeats']} runs per side, "
        "same process.",
        "",
        "| workload | old s | new s | speed-up | same clients | same masks | same labeled counts |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, w in result["workloads"].items():
        masks = w.get("same_masks", "n/a (redrawn, by design)")
        lines.append(
            f"| {name} | {w['old_seconds']:.2f} | {w['new_seconds']:.2f} | {w['ratio']:.1f}x | "
            f"{w['same_clients']} | {masks} | {w['same_labeled_counts']} |"
        )
    f = result["failing_dirichlet"]
    lines += [
        "",
        f"Failing Dirichlet config ({f['config']}): old {f['old_seconds']:.2f} s ({f['old_draws']} draws), "
        f"new {f['new_seconds']:.3f} s ({f['new_draws']} draws), {f['ratio']:.0f}x. New error: "
        f"{f['new_error']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
