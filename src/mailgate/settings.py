"""Node-local settings (PRODUCT §4.1): a TOML file found from -c/--config, else
$MAILGATE_CONFIG, else ./mailgate.toml, else built-in defaults.

Organization settings (domains, mailboxes, connectors, transport settings) are not here:
they live in the store, like Exchange's directory.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path


class SettingsError(Exception):
    pass


@dataclass(frozen=True)
class NodeSettings:
    node_name: str
    data_dir: Path
    store_url: str
    smtp_listen: str
    http_listen: str
    config_file: Path | None


DEFAULT_CONFIG_NAME = "mailgate.toml"


def find_config(explicit: str | None, cwd: Path | None = None) -> Path | None:
    """The config file to use, or None for built-in defaults."""
    cwd = cwd or Path.cwd()
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SettingsError(f"config file {explicit} "
                                f"{'is not a file' if path.exists() else 'does not exist'}")
        return path.resolve()
    env = os.environ.get("MAILGATE_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise SettingsError(f"config file {env} (from $MAILGATE_CONFIG) does not exist")
        return path.resolve()
    local = cwd / DEFAULT_CONFIG_NAME
    return local.resolve() if local.is_file() else None


def load_settings(explicit: str | None = None, cwd: Path | None = None) -> NodeSettings:
    cwd = cwd or Path.cwd()
    path = find_config(explicit, cwd)
    raw: dict[str, object] = {}
    base = cwd
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from exc
        base = path.parent

    def section(name: str) -> dict[str, object]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise SettingsError(f"{path}: [{name}] must be a table")
        return value

    def text(sec: dict[str, object], key: str, default: str) -> str:
        value = sec.get(key, default)
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{path}: {key} must be a non-empty string")
        return value

    node = section("node")
    store = section("store")
    smtp = section("smtp")
    http = section("http")
    name = text(node, "name", socket.gethostname().split(".")[0] or "localhost")
    data_dir = Path(text(node, "data_dir", "./var"))
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()
    url = text(store, "url", f"sqlite:///{data_dir / 'mailgate.db'}")
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_absolute():
        url = f"sqlite:///{(base / url[len('sqlite:///'):]).resolve()}"
    return NodeSettings(
        node_name=name,
        data_dir=data_dir,
        store_url=url,
        smtp_listen=text(smtp, "listen", "127.0.0.1:2525"),
        http_listen=text(http, "listen", "127.0.0.1:8025"),
        config_file=path,
    )


CONFIG_TEMPLATE = """\
# mailgate node configuration (PRODUCT.md §4.1). Every key is optional.
# Organization settings (accepted domains, mailboxes, connectors, transport settings)
# are not here: they live in the store and are changed with the mailgate CLI.

[node]
# name = "{name}"          # default: this host's name
data_dir = "./var"          # pickup/, replay/, drop/, mailboxes/ and the store live here

[store]
# url = "sqlite:///var/mailgate.db"   # default: <data_dir>/mailgate.db

[smtp]
# listen = "127.0.0.1:2525"  # the node's default Receive connector (SMTP comes later)

[http]
# listen = "127.0.0.1:8025"  # REST API and web UI (later)
"""


def host_name(fallback: str) -> str:
    """This host's FQDN for Received: lines and reports; never 'localhost'."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not name.startswith("localhost"):
            return name
    return fallback
