"""What Flower's runtime shows of a fedtail run: the strategy banner once, the config in one line."""

from __future__ import annotations

import logging

from server.app import StrategyBannerOnce


def _banner(logger: logging.Logger) -> None:
    logger.info("Starting %s strategy:", "FedAvgStrategy")
    logger.info("\t├── Number of rounds: %d", 5)
    logger.info("\t├── ConfigRecord (train): %s", "{'job': " + "x" * 5000 + "}")
    logger.info("\t└──> Keys in records:")
    logger.info("")


def test_the_banner_shows_once_with_a_one_line_config(caplog) -> None:
    logger = logging.getLogger("test-flower-banner")
    banner = StrategyBannerOnce()
    logger.addFilter(banner)
    with caplog.at_level(logging.INFO, logger="test-flower-banner"):
        _banner(logger)
        logger.info("[ROUND %s/%s]", 1, 5)
        _banner(logger)  # the next task's start
        logger.info("[ROUND %s/%s]", 1, 5)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("Starting") for line in lines) == 1
    assert lines.count("[ROUND 1/5]") == 2
    config = next(line for line in lines if "ConfigRecord (train)" in line)
    assert len(config) < 120 and "xxxx" not in config
