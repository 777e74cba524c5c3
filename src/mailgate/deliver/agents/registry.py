"""Finding delivery agents (entry-point group `mailgate.delivery_agents`) and checking the
settings a connector gives them.

`discover()` lists every protocol found, with the version and origin of the distribution
that declares it; an entry point that cannot be loaded is listed with its error, never
fatal. `check_settings()` validates `--setting name=value` pairs against what the agent
declares (unknown names, missing required ones, types); a secret setting is only accepted
as `<name>-env=VARIABLE`, so its value is never stored or printed. `resolve_settings()`
gives the agent its typed values, reading secrets from the environment.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any, Mapping

from mailgate.deliver.agents.api import DeliveryAgent, Setting

ENTRY_POINT_GROUP = "mailgate.delivery_agents"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class AgentError(ValueError):
    """A setting or agent problem, as one line for the administrator."""


@dataclass
class AgentInfo:
    name: str                        # the protocol name (--delivery-protocol)
    version: str
    origin: str                      # distribution that declares it, and the object path
    agent: type[DeliveryAgent] | None = None
    settings: tuple[Setting, ...] = ()
    recipient_limit: int | None = None
    error: str | None = None         # why it could not be loaded


def discover() -> list[AgentInfo]:
    found: dict[str, AgentInfo] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        origin = f"{dist.name if dist else '?'} ({ep.value})"
        version = dist.version if dist else "?"
        if ep.name in found:
            found[ep.name].error = f"declared twice: also by {origin}"
            continue
        try:
            cls = ep.load()
            settings = tuple(getattr(cls, "settings", ()))
            if not all(isinstance(s, Setting) for s in settings):
                raise TypeError("`settings` must be a tuple of mailgate Setting objects")
            if not callable(getattr(cls, "open_connection", None)):
                raise TypeError("it has no open_connection method")
            found[ep.name] = AgentInfo(ep.name, version, origin, cls, settings,
                                       getattr(cls, "recipient_limit", None))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not fatal
            found[ep.name] = AgentInfo(ep.name, version, origin,
                                       error=f"cannot load: {type(exc).__name__}: {exc}")
    return sorted(found.values(), key=lambda a: a.name)


def find(name: str) -> AgentInfo:
    agents = discover()
    for info in agents:
        if info.name.casefold() == name.casefold():
            if info.error:
                raise AgentError(f"delivery protocol '{info.name}' is broken: {info.error}")
            return info
    known = ", ".join(a.name for a in agents) or "none installed"
    raise AgentError(f"unknown delivery protocol '{name}' (found: {known})")


def _check_value(s: Setting, value: str) -> None:
    if s.type == "int" and not re.fullmatch(r"-?\d+", value):
        raise AgentError(f"setting {s.name} must be a whole number, not '{value}'")
    if s.type == "bool" and value.lower() not in ("true", "false"):
        raise AgentError(f"setting {s.name} must be true or false, not '{value}'")
    if s.type == "url" and not re.match(r"^https?://[^\s/]+", value):
        raise AgentError(f"setting {s.name} must be an http:// or https:// URL")
    if any(ord(ch) < 32 for ch in value):
        raise AgentError(f"setting {s.name} must not contain control characters")


def check_settings(info: AgentInfo, given: Mapping[str, str]) -> dict[str, str]:
    """The settings to store for a connector using this agent, or AgentError."""
    declared = {s.name: s for s in info.settings}
    out: dict[str, str] = {}
    for key, value in given.items():
        name = key[:-4] if key.endswith("-env") else key
        s = declared.get(name)
        if s is None:
            names = ", ".join(declared) or "none"
            raise AgentError(f"the {info.name} agent has no setting '{key}' (it takes: {names})")
        if s.secret and not key.endswith("-env"):
            raise AgentError(f"setting {name} is a secret: give the name of an environment "
                             f"variable that holds it, as {name}-env=VARIABLE")
        if key.endswith("-env"):
            if not s.secret:
                raise AgentError(f"setting {name} is not a secret: give it as {name}=value")
            if not _ENV_NAME.match(value):
                raise AgentError(f"{key} must name an environment variable, not '{value}'")
        else:
            _check_value(s, value)
        out[key] = value
    for s in info.settings:
        if s.required and s.name not in out and f"{s.name}-env" not in out and s.default is None:
            raise AgentError(f"the {info.name} agent needs the setting {s.name}"
                             + (f" (as {s.name}-env=VARIABLE)" if s.secret else ""))
    return out


def resolve_settings(info: AgentInfo, stored: Mapping[str, str],
                     environ: Mapping[str, str]) -> dict[str, Any]:
    """Typed values for the agent; secrets read from the environment (AgentError if the
    variable is not set)."""
    out: dict[str, Any] = {}
    for s in info.settings:
        if f"{s.name}-env" in stored:
            variable = stored[f"{s.name}-env"]
            if variable not in environ:
                raise AgentError(f"environment variable {variable} (setting {s.name}) is not "
                                 f"set for the node")
            out[s.name] = environ[variable]
            continue
        raw = stored.get(s.name, s.default)
        if raw is None:
            continue
        out[s.name] = (int(raw) if s.type == "int" else raw.lower() == "true"
                       if s.type == "bool" else raw)
    return out


def int_setting(settings: Mapping[str, Any], name: str, default: int | None) -> int | None:
    """A whole-number setting of at least 1 (stored as text or resolved), or `default`."""
    value = settings.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not (isinstance(value, int)
                                       or re.fullmatch(r"-?\d+", str(value))):
        raise AgentError(f"setting {name} must be a whole number, not '{value}'")
    number = int(value)
    if number < 1:
        raise AgentError(f"setting {name} must be 1 or more, not {number}")
    return number
