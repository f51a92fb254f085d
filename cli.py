"""`lab`: the command line of the lab. A thin layer: parse, call one function, print.

Every command takes --json (one JSON document on stdout, for an agent). Exit codes:
0 success; 1 the work failed (a job failed, a check did not hold); 2 bad input (usage, unknown
key, wrong lane, missing file); 3 timed out (`lab wait`). Errors go to stderr as `Error: ...`.
Nothing imports this module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from config import ConfigError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3


class BadInput(click.ClickException):
    """A user error: one line on stderr, exit 2, nothing done."""

    exit_code = EXIT_BAD_INPUT


class Failed(click.ClickException):
    """The work ran and failed: exit 1."""

    exit_code = EXIT_FAILED


class LabGroup(click.Group):
    """Turns the project's validation errors into `Error: ...` with exit 2, wherever raised."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, FileNotFoundError) as e:
            raise BadInput(str(e)) from None


def emit(data: Any, as_json: bool, text: Callable[[Any], str] | str | None = None) -> None:
    """Print `data` as JSON, or as text for a person."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif callable(text):
        click.echo(text(data))
    elif text is not None:
        click.echo(text)
    else:
        click.echo(json.dumps(data, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for agents).")


@click.group(cls=LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reasoning-lab")
def main() -> None:
    """reasoning-lab: train tiny reasoning models, run ablations, and queue work for one GPU.

    \b
    Typical loop:
      lab smoke --preset tiny --arch refiner        # does it build and learn at all?
      lab submit ablation --lane cpu --set ...      # does the idea win an ablation?
      lab wait ID --json                            # block until it ends (exit 0/1/3)
      lab show ID --json                            # read the result

    Every command has --help and --json.
    """


def _set_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Override a config or spec key (repeatable), e.g. --set d_model=128.")


# --- model and training commands (models/, jobs/smoke, jobs/train, jobs/tokenize) -------------


# --- ablation commands (harness/, jobs/ablation) ----------------------------------------------


# --- queue commands (daemon/, workers/) -------------------------------------------------------


# --- GitHub commands (daemon/github.py) -------------------------------------------------------


# --- records, storage and guardrail commands (daemon/records.py, jobs/archive) ----------------


if __name__ == "__main__":
    sys.exit(main())
