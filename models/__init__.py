"""The science: both architectures, their parts, the tokenizer, data and trainer.
Nothing here knows about the queue or the CLI.

The package itself imports no torch: `models.flops` (sizes and FLOPs from a config) serves spec
validation in the daemon and at submit, where importing torch would cost seconds. The
architectures load on first use of a name below."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from config import Config, ModelConfig

if TYPE_CHECKING:
    import torch.nn as nn

    from models.reasoner import Reasoner
    from models.refiner import CausalRefiner


def build_model(cfg: Config | ModelConfig) -> CausalRefiner | Reasoner:
    """The architecture named by cfg.model.arch ("refiner" or "reasoner")."""
    from models.reasoner import Reasoner
    from models.refiner import CausalRefiner

    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    return CausalRefiner(mcfg) if mcfg.arch == "refiner" else Reasoner(mcfg)


def count_params(model: nn.Module) -> int:
    """Unique parameters (the tied head is counted once)."""
    return sum(p.numel() for p in model.parameters())


def __getattr__(name: str) -> Any:
    if name == "CausalRefiner":
        from models.refiner import CausalRefiner

        return CausalRefiner
    if name == "Reasoner":
        from models.reasoner import Reasoner

        return Reasoner
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = ["CausalRefiner", "Reasoner", "build_model", "count_params"]
