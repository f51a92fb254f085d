"""models/step.py's TrainStep with `train.compile` off and on: the same losses, and the model's
own state (what checkpoints hold) untouched by compilation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import config
from models import build_model
from models.step import TrainStep


def _compile_works() -> str | None:
    """None when torch.compile (inductor: it needs a C++ compiler) runs here, else why not."""
    try:
        f = torch.compile(lambda a: a * 2 + 1)
        f(torch.ones(2))
        return None
    except Exception as e:  # no compiler, an unsupported python: the reason goes in the skip
        return f"torch.compile cannot run here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _losses(compile_: bool, arch: str, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    # One depth of one pass and no prelude block, so the compiled run compiles one small graph
    # (each new depth is a recompile; the prelude's Block is the shared one's code again, ~12 s
    # more of inductor here): the loop, the gate and the time signal still go through the compiler.
    cfg = config.preset("tiny", arch, block_size=16, batch_size=2, d_model=16, n_heads=2, warmup_steps=0,
                        depth_min=1, depth_max=1, depth_eval=1, backprop_steps=1, n_layers=1, n_prelude=0,
                        compile=compile_)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    step = TrainStep(model, cfg, "cpu")
    rng = np.random.default_rng(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(rng.integers(0, cfg.model.vocab_size, (2, 17)))
        return x[:, :-1], x[:, 1:]

    losses = [step(batch, i)[0] for i in range(steps)]
    return losses, model.state_dict()


def test_compile_is_off_by_default_and_validated() -> None:
    assert config.TrainConfig().compile is False
    with pytest.raises(config.ConfigError, match="train.compile"):
        config.TrainConfig(compile=1)  # type: ignore[arg-type]


def test_compiled_step_gives_the_eager_losses() -> None:
    """The refiner (the lab's model; its loop, no-grad passes and gate go through the compiler);
    ~1 min on 2 cores, most of it inductor compiling the one graph."""
    why = _compile_works()
    if why is not None:
        pytest.skip(why)
    eager, eager_state = _losses(False, "refiner")
    compiled, compiled_state = _losses(True, "refiner")
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # The model is not wrapped: the same keys (no `_orig_mod.`), so checkpoints and resume match.
    assert list(compiled_state) == list(eager_state)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-5)
