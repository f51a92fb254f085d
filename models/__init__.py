"""The science: both architectures, their parts, the tokenizer, data and trainer.
Nothing here knows about the queue or the CLI."""

from __future__ import annotations

import torch.nn as nn

from config import Config, ModelConfig
from models.reasoner import Reasoner
from models.refiner import CausalRefiner


def build_model(cfg: Config | ModelConfig) -> CausalRefiner | Reasoner:
    """The architecture named by cfg.model.arch ("refiner" or "reasoner")."""
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    return CausalRefiner(mcfg) if mcfg.arch == "refiner" else Reasoner(mcfg)


def count_params(model: nn.Module) -> int:
    """Unique parameters (the tied head is counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["CausalRefiner", "Reasoner", "build_model", "count_params"]
