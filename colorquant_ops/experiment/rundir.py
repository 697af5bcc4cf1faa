"""A training run's directory, and the RNG states that let ``--resume`` continue it exactly.

:class:`RunDir` holds ``settings.json`` (the arguments), ``log.txt`` (what is printed),
``metrics.jsonl`` (one JSON object per epoch), ``last.pt`` (what ``--resume`` needs) and the model
checkpoints ``best.pt`` / ``final.pt``. Used by the trainers and by ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checkpoint import _short
from .._io import atomic_write_text, save_atomic

__all__ = ["RunDir", "rng_state", "seed_everything", "set_rng_state"]

#: Settings a resumed run may change (where the data lives, how it runs, how long). A different
#: number of processes continues the run, though not exactly (see :func:`colorquant_ops.experiment.train.fit`).
_RESUME_FREE = frozenset({"epochs", "resume", "progress", "workers", "device", "compile", "out_dir",
                          "data_root", "cache_dir", "classifier", "world_size"})

#: What runs from before an option existed ran with, for a settings.json without it (compared only where
#: the resumed run has the option): train-classifier's schedule was the step schedule, train's model ColorCNN.
_BEFORE_OPTION = {"schedule": "step", "model": "colorcnn"}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunDir:
    """A run's directory: ``settings.json``, ``log.txt``, ``metrics.jsonl``, ``last.pt``, ``best.pt``, ``final.pt``.

    The directory is created by the first write, so that arguments can be checked before.
    With ``main=False`` (ranks other than 0 of a multi-process run) nothing is written or printed.
    """

    def __init__(self, path, resume: bool = False, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        if resume and not self.last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.last}")
        if not resume and self.last.is_file():
            raise ValueError(f"{self.path} holds a run already (last.pt): pass --resume or another --out-dir")

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def _append(self, name: str, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / name, "a") as f:
            f.write(text)

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(message)
            self._append("log.txt", message + "\n")

    def write_settings(self, args: argparse.Namespace, **extra) -> None:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            settings = {**vars(args), **extra}
            atomic_write_text(self.path / "settings.json", json.dumps(settings, indent=2, default=str) + "\n")

    def check_resume_settings(self, args: argparse.Namespace) -> None:
        """``--resume`` continues exactly only with the same settings, except those in :data:`_RESUME_FREE`
        (and options newer than the run that are left off)."""
        path = self.path / "settings.json"
        if not path.is_file():
            return
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(vars(args), default=str))
        old.update({k: v for k, v in _BEFORE_OPTION.items() if k in new and k not in old})
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                   if k not in _RESUME_FREE and old.get(k) != new.get(k)
                   and not (k not in old and new.get(k) in (None, False))]
        if changed:
            raise ValueError(f"--resume with other settings than {path}: {', '.join(changed)}")

    def append_metrics(self, record: dict) -> None:
        if self.main:
            self._append("metrics.jsonl", json.dumps(record) + "\n")

    def save_state(self, state: dict) -> None:
        """Write ``last.pt`` atomically. The trainers append an epoch's metrics line first, so a kill
        between the two leaves a line ahead of ``last.pt``, which :meth:`load_state` drops."""
        if self.main:
            save_atomic(state, self.last)

    def load_state(self) -> dict:
        """Read ``last.pt`` (onto the CPU; ``load_state_dict`` moves it), and drop the lines of
        ``metrics.jsonl`` it does not account for (epochs after its own, a line cut short by a kill):
        the resumed run writes them again."""
        try:
            state = torch.load(self.last, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read the resume checkpoint {self.last}: {_short(exc)}") from exc
        if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
            raise ValueError(f"cannot read the resume checkpoint {self.last}: not a resume state of this program")
        if self.main:
            self._trim_metrics(state["epoch"])
        return state

    def _trim_metrics(self, epoch: int) -> None:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        text = path.read_text()
        kept = []
        for line in text.splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short
                continue
            if line.endswith("\n") and isinstance(record, dict) and record.get("epoch", 0) <= epoch:
                kept.append(line)
        if "".join(kept) != text:
            atomic_write_text(path, "".join(kept))
