"""One query-encoder tuning run's settings (:class:`TrainConfig`): the one home of their defaults.

Kept apart from :mod:`embedding.tuning` so that reading a default (the retune job's
config, the CLI's help) does not import torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    """One tuning run.

    Attributes
    ----------
    lr : peak AdamW learning rate; "adiabatic" values for multilingual-e5 are 2e-8..6e-8
        (about 1.3e-7 with the FFN output projections frozen).
    weight_decay : AdamW decoupled weight decay.
    warmup_ratio : share of the steps with a linear warm-up from 0; then linear decay to 0.
    epochs : passes over the examples (ignored when ``steps`` is set).
    steps : optimizer steps (the examples are cycled, reshuffled each pass).
    batch_size : examples per step; each is also an in-batch negative for the others.
    clip : gradient-norm clipping (0 = off).
    seed : shuffling and dropout.
    temperature : InfoNCE temperature on cosine / mean-MaxSim scores.
    freeze : glob patterns over parameter names (``fnmatch``, ``*`` crosses dots).
    in_batch : use the other examples' positives as negatives.
    """

    lr: float = 5e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    steps: "int | None" = None
    batch_size: int = 32
    clip: float = 1.0
    seed: int = 0
    temperature: float = 0.05
    freeze: tuple[str, ...] = ()
    in_batch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {self.clip}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for pattern in self.freeze:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(f"freeze patterns must be non-empty strings, got {pattern!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["freeze"] = list(self.freeze)
        return d
