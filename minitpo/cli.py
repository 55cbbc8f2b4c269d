"""The `minitpo` command line. Each command is a thin shell over one module; user mistakes
(`UserError`) print as one line and exit with status 2, without a traceback."""

import sys

import click

from minitpo.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="minitpo")
def cli():
    """minitpo: teach a small instruct LLM to think before it answers, by Thought Preference
    Optimization (Wu et al., 2024)."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: recipe's `out`, else runs/<recipe name>).")
@click.option("--fresh", is_flag=True, help="Delete the run directory first and start over.")
def run(recipe, overrides, out, fresh):
    """Run the TPO iterations of RECIPE (a YAML file), resuming a run that was stopped.

    OVERRIDES are dotted KEY=VALUE pairs applied on top of the recipe, e.g. sampling.k=4 train.lr=1e-5."""
    from minitpo.config import load_recipe
    from minitpo.loop import run as run_loop

    if out:
        overrides = (*overrides, f"out={out}")
    out_dir = run_loop(load_recipe(recipe, list(overrides)), fresh=fresh)
    click.echo(f"done: {out_dir}")


def main():
    try:
        cli.main(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
