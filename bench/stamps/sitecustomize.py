"""A measuring instrument for ``bench.deployed``: on the benchmark's Flower processes only (their
``PYTHONPATH``), every log line starts with its wall-clock time and process id."""

import logging
import os

_format = logging.Formatter.format


def _stamped(self, record):
    return f"{record.created:.3f} {os.getpid()} " + _format(self, record)


logging.Formatter.format = _stamped
