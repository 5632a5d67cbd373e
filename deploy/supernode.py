"""``twinfed-supernode``: Flower's ``flower-supernode``, asking its SuperLink for work more often.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s
before asking again (``flwr/supernode/start_client_internal.py``); it also waits in steps of
0.5 s for its ClientApp's reply. A SecAgg+ round sends every node four messages one after the
other, so each round a node idles for about 4 x 1.5 s on average (and the round waits for the
slowest of its nodes, up to 4 x 3 s) between messages that are already waiting for it. Flower
has no option for this; this entry point runs Flower's own SuperNode with every such wait capped
at ``--pull-interval`` seconds (default :data:`DEFAULT_PULL_INTERVAL_S`) and changes nothing
else: every other argument is ``flower-supernode``'s, passed on unchanged.

What it costs: one small request to the SuperLink per node per ``--pull-interval`` while idle
(4 a second per node at the default). For a consortium of hundreds of nodes on one SuperLink,
raise it; ``--pull-interval 3`` is Flower's own behaviour.

It applies only to the Flower release it was checked against (:data:`CHECKED_FLWR`): on any
other the waits may have moved, so it refuses to start and says to run ``flower-supernode``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
import types

DEFAULT_PULL_INTERVAL_S = 0.25
CHECKED_FLWR = "1.42."
# The waits of flwr 1.42's SuperNode loop that --pull-interval caps.
_EXPECTED_WAITS = ("time.sleep(3)", "time.sleep(0.5)")


class PullIntervalError(SystemExit):
    pass


class _CappedTime(types.ModuleType):
    """The ``time`` module as one Flower module sees it: ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        super().__init__("time")
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_supernode_waits(cap: float, module=None) -> None:
    """Cap the SuperNode loop's waits at ``cap`` seconds (``module``: Flower's
    ``start_client_internal``, for tests). Raises :class:`PullIntervalError` when this Flower is
    not the release the waits were checked in."""
    import flwr

    if not (math.isfinite(cap) and 0.01 <= cap <= 3.0):
        raise PullIntervalError("twinfed-supernode: --pull-interval must be a number of seconds "
                                "between 0.01 and 3")
    if module is None:
        if not flwr.__version__.startswith(CHECKED_FLWR):
            raise PullIntervalError(
                f"twinfed-supernode was checked against flwr {CHECKED_FLWR}x, this is flwr "
                f"{flwr.__version__}; run flower-supernode with the same arguments instead")
        from flwr.supernode import start_client_internal as module
    source = inspect.getsource(module)
    missing = [w for w in _EXPECTED_WAITS if w not in source]
    current = getattr(module, "time", None)
    if missing or (current is not time and not isinstance(current, _CappedTime)):
        raise PullIntervalError("twinfed-supernode: this Flower's SuperNode loop is not the one "
                                "it was checked against; run flower-supernode instead")
    module.time = _CappedTime(cap)


def parse_args(argv: list[str]) -> tuple[float, list[str]]:
    p = argparse.ArgumentParser(prog="twinfed-supernode", add_help=False)
    p.add_argument("--pull-interval", type=float, default=DEFAULT_PULL_INTERVAL_S)
    ns, rest = p.parse_known_args(argv)
    return ns.pull_interval, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0] + f"\n\n  --pull-interval S   at most S seconds between two requests "
              f"for work (default {DEFAULT_PULL_INTERVAL_S}; Flower's: 3)\n\nflower-supernode's own "
              "options follow.\n", flush=True)
    cap, rest = parse_args(argv)
    try:
        cap_supernode_waits(cap)
    except PullIntervalError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
