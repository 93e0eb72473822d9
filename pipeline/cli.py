"""`glr`: the one place that wires submissions, tuning and pipeline into commands.

Commands are thin: parse, call one function, print. Heavy libraries (pandas, TensorFlow,
OpenCV, Optuna) are imported inside the commands so `glr --help` starts instantly.
Errors a user can fix are `UserError`s: printed as one line, exit status 1, no traceback.
"""
from __future__ import annotations

import json
import sys

import click

from submissions.errors import UserError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from pipeline.progress import set_quiet

        set_quiet(True)
    return value


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
    help="No progress bars (they are also off when stderr is not a terminal).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def echo_json(obj: dict) -> None:
    """Print one JSON object on stdout (numpy scalars and paths allowed)."""

    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    click.echo(json.dumps(obj, default=default, indent=None))


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="glr")
def cli() -> None:
    """glr: from Kaggle's Google Landmark Recognition files to a validated submission.

    \b
    Quick start (synthetic mini-competition, no downloads):
      glr demo --out demo
    Real competition:
      glr fetch landmark-recognition-2021 --data-dir data
      glr run glr.toml            (see `glr config-example`)
    """


def main() -> None:
    """Console-script entry point: user errors become one line and exit status 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted; finished work is kept, re-run to resume.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


# ----------------------------------------------------------------------------------------
# Each section below belongs to one area; keep commands thin and imports inside them.
# ----------------------------------------------------------------------------------------

# === section: contract & synthetic data (issue 2: gap, synth) ===

# === end section: contract & synthetic data ===

# === section: Kaggle side (issue 3: fetch, fetch-urls, clean, submit) ===

# === end section: Kaggle side ===

# === section: models (issue 4: train, predict, ensemble, evaluate) ===

# === end section: models ===

# === section: verification (issue 5: features, verify, merge, match) ===

# === end section: verification ===

# === section: tuning (issue 6: tune, rescore, write-submission) ===

# === end section: tuning ===

# === section: end to end (issue 7: run, demo, config-example) ===

# === end section: end to end ===


if __name__ == "__main__":
    main()
