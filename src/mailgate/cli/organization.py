"""accepted-domain, mailbox and foreign-connector commands."""

from __future__ import annotations

import sys
from typing import Any

import click

from mailgate.admin import AdminError, passwords
from mailgate.admin import organization as admin
from mailgate.cli.main import Context, handled, warn
from mailgate.cli.output import emit
from mailgate.cli.params import BOOL, DURATION, SIZE, Given
from mailgate.core.units import format_size, seconds_shown
from mailgate.deliver.maildir import MaildirStore
from mailgate.directory import load_organization
from mailgate.organization import (
    CONFIRMATION_TIMEOUT_ACTIONS,
    AcceptedDomain,
    ForeignConnector,
    Mailbox,
    Organization,
)
from mailgate.store import Store

JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def multi_valued(option: str, metavar: str, what: str) -> Any:
    """`--X` (replace), `--add-X` and `--remove-X`: Exchange's @{Add=...;Remove=...}."""
    def decorate(fn: Any) -> Any:
        for opt in reversed([
            click.option(f"--{option}", multiple=True, metavar=metavar,
                         help=f"Replace the {what} (repeat for several)."),
            click.option(f"--add-{option}", multiple=True, metavar=metavar),
            click.option(f"--remove-{option}", multiple=True, metavar=metavar),
        ]):
            fn = opt(fn)
        return fn
    return decorate


def _many(values: tuple[str, ...]) -> list[str] | None:
    """Multi-valued options repeat; a value may also hold a ';'-free comma list."""
    return list(values) if values else None


# -- accepted domains -------------------------------------------------------------------

def _domain_row(d: AcceptedDomain) -> dict[str, Any]:
    return {"Identity": d.name, "Guid": d.guid, "Name": d.name, "DomainName": d.domain_name,
            "DomainType": d.domain_type, "Default": d.default}


DOMAIN_COLUMNS = ("Name", "DomainName", "DomainType", "Default")


@click.group("accepted-domain")
def accepted_domain() -> None:
    """Accepted domains: the domains this organization receives mail for."""


@accepted_domain.command("new")
@click.option("--domain-name", required=True, help="The domain, e.g. contoso.test.")
@click.option("--name", help="A name for the domain (default: the domain name).")
@click.option("--domain-type", default="authoritative", show_default=True,
              help="authoritative or internal-relay.")
@click.option("--default", "default", is_flag=True, help="Make it the default accepted domain.")
@JSON
@click.pass_obj
@handled
def domain_new(obj: Context, domain_name: str, name: str | None, domain_type: str,
               default: bool, as_json: bool) -> None:
    d = obj.run(lambda s: admin.new_accepted_domain(s, domain_name=domain_name, name=name,
                                                     domain_type=domain_type, default=default))
    emit([_domain_row(d)], DOMAIN_COLUMNS, as_json, single=True)


@accepted_domain.command("get")
@click.argument("identity", required=False)
@JSON
@click.pass_obj
@handled
def domain_get(obj: Context, identity: str | None, as_json: bool) -> None:
    async def run(s: Store) -> list[AcceptedDomain]:
        org = await load_organization(s, s.node)
        return [admin.find_domain(org, identity)] if identity else org.accepted_domains
    emit([_domain_row(d) for d in obj.run(run)], DOMAIN_COLUMNS, as_json)


@accepted_domain.command("set")
@click.argument("identity")
@click.option("--name")
@click.option("--domain-type", help="authoritative or internal-relay.")
@click.option("--default", "default", type=BOOL, help="true makes it the default domain.")
@JSON
@click.pass_obj
@handled
def domain_set(obj: Context, identity: str, name: str | None, domain_type: str | None,
               default: bool | None, as_json: bool) -> None:
    d = obj.run(lambda s: admin.set_accepted_domain(s, identity, name=name,
                                                     domain_type=domain_type, default=default))
    emit([_domain_row(d)], DOMAIN_COLUMNS, as_json, single=True)


@accepted_domain.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def domain_remove(obj: Context, identity: str) -> None:
    obj.run(lambda s: admin.remove_accepted_domain(s, identity))


# -- mailboxes --------------------------------------------------------------------------

def _mailbox_row(m: Mailbox, maildirs: MaildirStore) -> dict[str, Any]:
    return {"Identity": m.name, "Guid": m.guid, "Name": m.name,
            "PrimarySmtpAddress": m.primary_smtp_address,
            "EmailAddresses": m.exchange_email_addresses(),
            "HasPassword": m.password_hash is not None,
            "Maildir": str(maildirs.maildir(m.primary_smtp_address))}


MAILBOX_COLUMNS = ("Name", "PrimarySmtpAddress", "EmailAddresses", "HasPassword", "Maildir")


@click.group("mailbox")
def mailbox() -> None:
    """Mailboxes: local delivery into Maildir, with proxy addresses of any type."""


def _maildirs(obj: Context) -> MaildirStore:
    return MaildirStore(obj.settings.data_dir / "mailboxes")


@mailbox.command("new")
@click.option("--name", required=True)
@click.option("--primary-smtp-address",
              help="The primary address (or mark one of --email-addresses with SMTP:).")
@click.option("--email-addresses", multiple=True, metavar="TYPE:ADDR",
              help="Further proxy addresses (repeat), e.g. FAX:+15550001 or smtp:al@contoso.test.")
@JSON
@click.pass_obj
@handled
def mailbox_new(obj: Context, name: str, primary_smtp_address: str | None,
                email_addresses: tuple[str, ...], as_json: bool) -> None:
    m = obj.run(lambda s: admin.new_mailbox(s, name=name,
                                            primary_smtp_address=primary_smtp_address,
                                            email_addresses=list(email_addresses)))
    emit([_mailbox_row(m, _maildirs(obj))], MAILBOX_COLUMNS, as_json, single=True)


@mailbox.command("get")
@click.argument("identity", required=False)
@JSON
@click.pass_obj
@handled
def mailbox_get(obj: Context, identity: str | None, as_json: bool) -> None:
    async def run(s: Store) -> list[Mailbox]:
        org = await load_organization(s, s.node)
        return [admin.find_mailbox(org, identity)] if identity else org.mailboxes
    maildirs = _maildirs(obj)
    emit([_mailbox_row(m, maildirs) for m in obj.run(run)], MAILBOX_COLUMNS, as_json)


@mailbox.command("set")
@click.argument("identity")
@click.option("--name")
@click.option("--primary-smtp-address")
@multi_valued("email-addresses", "TYPE:ADDR", "further proxy addresses")
@JSON
@click.pass_obj
@handled
def mailbox_set(obj: Context, identity: str, name: str | None,
                primary_smtp_address: str | None, email_addresses: tuple[str, ...],
                add_email_addresses: tuple[str, ...], remove_email_addresses: tuple[str, ...],
                as_json: bool) -> None:
    m = obj.run(lambda s: admin.set_mailbox(
        s, identity, name=name, primary_smtp_address=primary_smtp_address,
        email_addresses=_many(email_addresses), add_email_addresses=_many(add_email_addresses),
        remove_email_addresses=_many(remove_email_addresses), maildirs=_maildirs(obj)))
    emit([_mailbox_row(m, _maildirs(obj))], MAILBOX_COLUMNS, as_json, single=True)


@mailbox.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def mailbox_remove(obj: Context, identity: str) -> None:
    obj.run(lambda s: admin.remove_mailbox(s, identity))


def _password_from_stdin() -> str:
    """The first line of stdin, without its line end (UTF-8)."""
    line = sys.stdin.buffer.readline(4096)
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        raise AdminError("--password-stdin: stdin has no password (give it on the first line)")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError("--password-stdin: the password is not UTF-8 text") from None


def _checked_password(value: str) -> str:
    try:
        passwords.check_password(value)
    except AdminError as exc:
        raise click.UsageError(str(exc)) from None  # click.prompt shows it and asks again
    return value


@mailbox.command("set-password")
@click.argument("identity")
@click.argument("extra", nargs=-1, metavar="")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of stdin (for scripts).")
@click.option("--clear", is_flag=True,
              help="Remove the password: the mailbox can no longer log on over SMTP.")
@click.pass_obj
@handled
def mailbox_set_password(obj: Context, identity: str, extra: tuple[str, ...],
                         password_stdin: bool, clear: bool) -> None:
    """Set the password a mailbox user logs on with (SMTP AUTH). On a terminal it is asked
    for twice without echo; it is never taken from the command line, never shown, and
    stored only as a salted scrypt hash."""
    if extra:
        # Not click's "unexpected extra argument (...)": that would print the password.
        raise AdminError("mailbox set-password takes no password on the command line (it "
                         "would stay in the shell history); type it at the prompt or use "
                         "--password-stdin")
    if clear and password_stdin:
        raise AdminError("--clear and --password-stdin cannot be combined")
    if clear:
        m = obj.run(lambda s: passwords.clear_mailbox_password(s, identity))
        click.echo(f"The password of mailbox {m.name} was removed.")
        return
    # Find the mailbox before asking, so that a typo does not cost a password entry.
    m = obj.run(lambda s: passwords.find_mailbox_for_password(s, identity))
    if password_stdin and not sys.stdin.isatty():
        password = _password_from_stdin()
    elif sys.stdin.isatty():   # also with --password-stdin: a terminal would echo it
        password = click.prompt(f"New password for {m.name}", hide_input=True,
                                confirmation_prompt=True, value_proc=_checked_password)
    else:
        raise AdminError("stdin is not a terminal: use --password-stdin to give the password "
                         "on stdin")
    obj.run(lambda s: passwords.set_mailbox_password(s, m.guid, password))
    click.echo(f"The password of mailbox {m.name} was set.")


# -- Foreign connectors -----------------------------------------------------------------

def _connector_row(c: ForeignConnector, org: Organization, obj: Context) -> dict[str, Any]:
    root = org.transport.resolve(obj.settings.data_dir, org.transport.root_drop_directory_path)
    return {
        "Identity": c.name, "Guid": c.guid, "Name": c.name,
        "AddressSpaces": [str(a) for a in c.address_spaces],
        "SourceTransportServers": list(c.source_transport_servers),
        "IsScopedConnector": c.is_scoped_connector,
        "DropDirectory": c.drop_directory or c.name,
        "DropDirectoryPath": str(c.drop_path(root)) if root else None,
        "DropDirectoryQuota": c.drop_directory_quota,
        "MaxMessageSize": c.max_message_size,
        "RelayDsnRequired": c.relay_dsn_required,
        "Enabled": c.enabled,
        "Comment": c.comment,
        "DeliveryConfirmation": c.delivery_confirmation,
        "ConfirmationTimeout": c.confirmation_timeout,
        "ConfirmationTimeoutAction": c.confirmation_timeout_action,
    }


def _connector_table(row: dict[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    shown["DropDirectoryQuota"] = format_size(row["DropDirectoryQuota"])
    shown["MaxMessageSize"] = format_size(row["MaxMessageSize"])
    shown["ConfirmationTimeout"] = seconds_shown(row["ConfirmationTimeout"])
    return shown


CONNECTOR_COLUMNS = ("Name", "AddressSpaces", "Enabled", "DropDirectoryPath",
                     "DropDirectoryQuota", "MaxMessageSize")


def _show_connectors(obj: Context, connectors: list[ForeignConnector], org: Organization,
                     as_json: bool, single: bool = False) -> None:
    rows = [_connector_row(c, org, obj) for c in connectors]
    emit(rows if as_json else [_connector_table(r) for r in rows], CONNECTOR_COLUMNS, as_json,
         single=single)


def _connector_settings(drop_directory: str | None, drop_directory_quota: Given | None,
                        max_message_size: Given | None, relay_dsn_required: bool | None,
                        enabled: bool | None, comment: str | None,
                        **confirmation: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"drop_directory": drop_directory,
                           "relay_dsn_required": relay_dsn_required, "enabled": enabled,
                           "comment": comment, **confirmation}
    if drop_directory_quota is not None:
        out["drop_directory_quota"] = drop_directory_quota.value
    if max_message_size is not None:
        out["max_message_size"] = max_message_size.value
    return out


def connector_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--source-transport-servers", multiple=True, metavar="NODE",
                     help="Nodes that host the connector (repeat; default: this node)."),
        click.option("--drop-directory", help="Folder name under RootDropDirectoryPath, or "
                                              "an absolute path (default: the connector name)."),
        click.option("--drop-directory-quota", type=SIZE, help="e.g. 100MB, or unlimited."),
        click.option("--max-message-size", type=SIZE, help="e.g. 10MB, or unlimited."),
        click.option("--relay-dsn-required", type=BOOL),
        click.option("--delivery-confirmation", type=BOOL,
                     help="Wait for the gateway's .ack/.nack file for each drop file."),
        click.option("--confirmation-timeout", type=DURATION,
                     help="How long to wait for it, e.g. 1h (default 1h)."),
        click.option("--confirmation-timeout-action",
                     type=click.Choice(CONFIRMATION_TIMEOUT_ACTIONS, case_sensitive=False),
                     help="No answer in time: Fail (NDR, the default), Delivered, or Retry "
                          "(take the file back and drop it again)."),
        click.option("--enabled", type=BOOL),
        click.option("--comment"),
        JSON,
    ]):
        fn = opt(fn)
    return fn


@click.group("foreign-connector")
def foreign_connector() -> None:
    """Foreign connectors: deliver to a non-SMTP system through a Drop directory."""


async def _with_warnings(s: Store, obj: Context, c: ForeignConnector
                         ) -> tuple[ForeignConnector, Organization, list[str]]:
    org = await load_organization(s, s.node)
    return c, org, admin.connector_warnings(c, org, obj.settings.data_dir)


@foreign_connector.command("new")
@click.option("--name", required=True)
@click.option("--address-spaces", multiple=True, required=True, metavar="[TYPE:]SPACE[;COST]",
              help='e.g. "FAX:*;1" or contoso.com (repeat for several).')
@connector_options
@click.pass_obj
@handled
def connector_new(obj: Context, name: str, address_spaces: tuple[str, ...],
                  source_transport_servers: tuple[str, ...], drop_directory: str | None,
                  drop_directory_quota: Given | None, max_message_size: Given | None,
                  relay_dsn_required: bool | None, enabled: bool | None, comment: str | None,
                  as_json: bool, **confirmation: Any) -> None:
    settings = _connector_settings(drop_directory, drop_directory_quota, max_message_size,
                                   relay_dsn_required, enabled, comment, **confirmation)

    async def run(s: Store) -> tuple[ForeignConnector, Organization, list[str]]:
        c = await admin.new_foreign_connector(
            s, name=name, address_spaces=list(address_spaces),
            source_transport_servers=_many(source_transport_servers), **settings)
        return await _with_warnings(s, obj, c)
    c, org, warnings = obj.run(run)
    for w in warnings:
        warn(w)
    _show_connectors(obj, [c], org, as_json, single=True)


@foreign_connector.command("get")
@click.argument("identity", required=False)
@JSON
@click.pass_obj
@handled
def connector_get(obj: Context, identity: str | None, as_json: bool) -> None:
    async def run(s: Store) -> tuple[list[ForeignConnector], Organization]:
        org = await load_organization(s, s.node)
        found = [admin.find_connector(org, identity)] if identity else org.foreign_connectors
        return found, org
    connectors, org = obj.run(run)
    _show_connectors(obj, connectors, org, as_json)


@foreign_connector.command("set")
@click.argument("identity")
@click.option("--name")
@multi_valued("address-spaces", "[TYPE:]SPACE[;COST]", "address spaces")
@connector_options
@click.pass_obj
@handled
def connector_set(obj: Context, identity: str, name: str | None,
                  address_spaces: tuple[str, ...], add_address_spaces: tuple[str, ...],
                  remove_address_spaces: tuple[str, ...],
                  source_transport_servers: tuple[str, ...], drop_directory: str | None,
                  drop_directory_quota: Given | None, max_message_size: Given | None,
                  relay_dsn_required: bool | None, enabled: bool | None, comment: str | None,
                  as_json: bool, **confirmation: Any) -> None:
    settings = _connector_settings(drop_directory, drop_directory_quota, max_message_size,
                                   relay_dsn_required, enabled, comment, **confirmation)

    async def run(s: Store) -> tuple[ForeignConnector, Organization, list[str]]:
        c = await admin.set_foreign_connector(
            s, identity, name=name, address_spaces=_many(address_spaces),
            add_address_spaces=_many(add_address_spaces),
            remove_address_spaces=_many(remove_address_spaces),
            source_transport_servers=_many(source_transport_servers), **settings)
        return await _with_warnings(s, obj, c)
    c, org, warnings = obj.run(run)
    for w in warnings:
        warn(w)
    _show_connectors(obj, [c], org, as_json, single=True)


@foreign_connector.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def connector_remove(obj: Context, identity: str) -> None:
    obj.run(lambda s: admin.remove_foreign_connector(s, identity))
