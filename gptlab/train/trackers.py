"""Experiment trackers: the rows of metrics.jsonl, mirrored into TensorBoard or Weights & Biases.

``--log tensorboard`` writes event files into ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``
shows every run side by side); ``--log wandb`` logs to W&B, whose files go under ``RUN_DIR/wandb/``:
with ``WANDB_MODE=offline`` nothing leaves the machine and ``wandb sync RUN_DIR/wandb/offline-run-*``
uploads it later. Both are optional extras (``pip install gptlab[tensorboard]`` / ``gptlab[wandb]``).

metrics.jsonl stays the record of a run: a tracker receives exactly the rows written there, each
number under ``STAGE/KEY`` (e.g. ``pretrain/val_loss``) at its step. On ``--resume`` the rows after
the checkpoint are dropped from metrics.jsonl, and TensorBoard is told to purge its events after that
step too, so the curves never show the abandoned stretch twice.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from gptlab.errors import GptlabError

TRACKERS = ("tensorboard", "wandb")


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, run_dir: Path, stage: str, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptlabError("--log tensorboard needs the tensorboard package: pip install 'gptlab[tensorboard]'") from None
        self.stage = stage
        # purge_step: events after the resumed checkpoint belong to an abandoned stretch of the run.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"{self.stage}/{k}", v, global_step=row["step"])
        self.writer.flush()   # a killed run keeps every logged row, like metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, stage: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise GptlabError("--log wandb needs the wandb package: pip install 'gptlab[wandb]' "
                              "(WANDB_MODE=offline logs without an account)") from None
        self.wandb, self.stage = wandb, stage
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptlab"), dir=str(run_dir),
                                  name=f"{run_dir.name}-{stage}", config=config, job_type=stage, reinit=True)
        except Exception as e:   # no login and not offline, a network failure, ...
            raise GptlabError(f"--log wandb: could not start a W&B run ({str(e).splitlines()[0] if str(e) else e!r}); "
                              "set WANDB_MODE=offline to log locally") from None

    def log(self, row: dict) -> None:
        self.run.log({f"{self.stage}/{k}": v for k, v in _numbers(row).items()}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers named by ``--log``; ``log(row)`` sends a metrics.jsonl row to each."""

    def __init__(self, names, run_dir: str | Path, stage: str, config: dict, start_step: int = 0):
        self.items = []
        run_dir = Path(run_dir)
        for name in dict.fromkeys(names or ()):
            if name == "tensorboard":
                self.items.append(_TensorBoard(run_dir, stage, start_step))
            elif name == "wandb":
                self.items.append(_WandB(run_dir, stage, config))
            else:
                raise GptlabError(f"--log {name}: unknown tracker (choose {', '.join(TRACKERS)})")

    def log(self, row: dict) -> None:
        for t in self.items:
            t.log(row)

    def close(self) -> None:
        for t in self.items:
            t.close()
        self.items = []
