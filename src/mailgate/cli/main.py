"""`mailgate [-c FILE] NOUN VERB [IDENTITY] [--option value ...]` (PRODUCT §4.2).

Nouns and options follow Exchange's cmdlets (New-ForeignConnector -AddressSpaces becomes
`mailgate foreign-connector new --address-spaces`). Every command is a thin shell over the
application services in `mailgate.admin`; errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from typing import Any, Awaitable, Callable, TypeVar

import click

from mailgate import __version__
from mailgate.admin import AdminError
from mailgate.core.units import UnitError
from mailgate.settings import NodeSettings, SettingsError, load_settings
from mailgate.store import Store, StoreError, open_store

T = TypeVar("T")


class Context:
    def __init__(self, config: str | None) -> None:
        self.config = config
        self._settings: NodeSettings | None = None

    @property
    def settings(self) -> NodeSettings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    def run(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        """Open the store, run `fn` against it, close it."""
        settings = self.settings

        async def main() -> T:
            store = open_store(settings.store_url, settings.node_name)
            try:
                return await fn(store)
            finally:
                await store.close()
        return asyncio.run(main())


def fail(message: str) -> None:
    click.echo(f"mailgate: error: {message}", err=True)
    sys.exit(1)


def warn(message: str) -> None:
    click.echo(f"WARNING: {message}", err=True)


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors an administrator can cause into one clear line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AdminError, SettingsError, UnitError) as exc:
            fail(str(exc))
        except StoreError as exc:
            fail(f"the store failed: {exc}")
        except KeyboardInterrupt:
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-c", "--config", metavar="FILE",
              help="Config file (default: $MAILGATE_CONFIG, else ./mailgate.toml).")
@click.version_option(__version__, prog_name="mailgate")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """mailgate: a mail transport service modelled on Exchange 2013 transport."""
    ctx.obj = Context(config)


_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main() -> None:
    """The `mailgate` entry point: click's usage errors become one line and exit 1 too."""
    try:
        cli.main(standalone_mode=False, prog_name="mailgate")
    except _NO_ARGS as exc:  # `mailgate` or `mailgate queue` alone: show the help
        click.echo(exc.ctx.get_help() if exc.ctx else "")  # type: ignore[union-attr]
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx else "mailgate"
        where = path.removeprefix("mailgate").strip()
        fail(f"{where}: {exc.format_message()}" if where else exc.format_message())
    except click.ClickException as exc:
        fail(exc.format_message())
    except click.exceptions.Abort:
        sys.exit(130)


def register() -> None:
    from mailgate.cli import (agents, message, node, organization, queue, send_connector,
                              tracking, transport)
    from mailgate.cli.receive_connector import receive_connector

    cli.add_command(node.init)
    cli.add_command(node.serve)
    cli.add_command(organization.accepted_domain)
    cli.add_command(organization.mailbox)
    cli.add_command(organization.foreign_connector)
    cli.add_command(transport.transport_service)
    cli.add_command(queue.queue)
    cli.add_command(message.message)
    cli.add_command(agents.delivery_agent)
    cli.add_command(agents.delivery_agent_connector)
    cli.add_command(send_connector.send_connector)
    cli.add_command(tracking.tracking)
    cli.add_command(receive_connector)


register()
