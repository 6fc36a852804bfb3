"""What a run tells its user: a plain-text log, TensorBoard scalars and tqdm progress, all from rank 0."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Optional, Sequence

from tqdm import tqdm


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear the progress bar apart."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never kill a run
            self.handleError(record)


class RunLogger:
    """Text log (``<output_dir>/log.txt``) and TensorBoard writer (``<output_dir>/tensorboard``).

    On other ranks than 0 every method is a no-op, so callers need no ``if rank == 0``.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True, name: str = "mabn"):
        self.enabled = enabled
        self.output_dir = output_dir
        self.writer = None
        self.log = logging.getLogger(f"{name}.{os.path.abspath(output_dir)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
        if not enabled:
            self.log.addHandler(logging.NullHandler())
            return
        os.makedirs(output_dir, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.FileHandler(os.path.join(output_dir, "log.txt")), _TqdmHandler()):
            handler.setFormatter(fmt)
            self.log.addHandler(handler)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def info(self, message: str) -> None:
        self.log.info(message)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}{key}", float(value), step)

    def config(self, cfg, metrics: Sequence[str] = ()) -> None:
        """The resolved config to TensorBoard: as YAML text and, with ``metrics`` (scalar tags such as
        ``val/top1_err``), as this run's hyperparameters, which the HParams tab compares across runs."""
        if self.writer is None:
            return
        self.writer.add_text("config", "\n".join("    " + line for line in cfg.dump().splitlines()))  # a code block
        if metrics:
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            hparams = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                       for key, value in _leaves(cfg.to_dict())}
            for summary in hparams_summaries(hparams, {tag: 0.0 for tag in metrics}):
                self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


def _leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def progress_bar(iterable: Iterable, enabled: bool, total: Optional[int] = None, desc: str = "", initial: int = 0):
    """A tqdm bar on rank 0 (and only when asked), the bare iterable elsewhere."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, file=sys.stderr)
