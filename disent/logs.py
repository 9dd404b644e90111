"""The command-line programs' logging: one stderr handler, rank-stamped lines, the level from $DISENT_LOG_LEVEL, and the
library noise that asks nothing of the user kept out."""
from __future__ import annotations

import logging
import os
import sys
import warnings

from disent.errors import InputError

LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


def setup_logging(rank: int = 0) -> None:
    """One handler on stderr, lines stamped with the rank. Rank 0 logs at $DISENT_LOG_LEVEL (default INFO), the
    others at WARNING (or the given level when it is quieter): N ranks repeating every line helps nobody."""
    chosen = os.environ.get("DISENT_LOG_LEVEL", "INFO").upper()
    if chosen not in LEVELS:
        raise InputError(f"DISENT_LOG_LEVEL={chosen!r} is not a log level; use one of {', '.join(LEVELS)}")
    level = LEVELS[chosen] if rank == 0 else max(LEVELS[chosen], logging.WARNING)
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_disent", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        handler._disent = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "alembic", "mlflow.store", "urllib3",
                  "mlflow.system_metrics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_known_library_warnings()


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_library_warnings() -> None:
    """Warnings every run printed at start, per rank and engine, that ask nothing of the user."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in deepspeed_logger.filters):
        # WarmupLR's own constructor reads its rate before step 0 and warns about it; the rate it
        # then sets is the intended warmup_min_lr.
        deepspeed_logger.addFilter(_DropMessages("Attempting to get learning rate from scheduler before it has started"))
    # ZeRO 1/2 in DeepSpeed 0.19 call a torch collective that torch has renamed; nothing to change here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
