"""The terminal progress bar: shown on a terminal only, replacing the per-round lines there."""

from __future__ import annotations

import io
import logging

from fedtail.progress import ROUND_RECORD, RoundProgress, round_description


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROW = {"task": 1, "round": 2, "global_round": 6, "balanced_accuracy": 0.51234, "train_loss": 0.25}


def test_description_is_one_based_like_the_log() -> None:
    assert round_description(ROW, 3, 4) == "task 2/3 round 2/4"
    assert round_description({**ROW, "stage": "crt"}, 3, 4) == "task 2/3 round 2/4 (cRT)"


def test_on_a_terminal_the_bar_replaces_the_round_lines() -> None:
    screen = _Terminal()
    logger = logging.getLogger("fedtail.test-progress")
    handler = logging.StreamHandler(screen)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with RoundProgress(12, 3, 4, stream=screen) as bar:
            assert bar.enabled
            logger.info("round line", extra={ROUND_RECORD: True})
            logger.info("other line")
            bar.update(ROW)
        logger.info("round line after", extra={ROUND_RECORD: True})
    finally:
        logger.removeHandler(handler)
    out = screen.getvalue()
    assert "task 2/3 round 2/4" in out and "6/12" in out and "bal_acc 0.5123" in out and "loss 0.2500" in out
    assert "other line" in out
    assert "round line after" in out
    assert "round line\n" not in out


def test_elsewhere_nothing_is_drawn() -> None:
    pipe = io.StringIO()
    with RoundProgress(12, 3, 4, stream=pipe) as bar:
        bar.update(ROW)
    assert not bar.enabled and pipe.getvalue() == ""
