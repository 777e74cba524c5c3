"""`mailgate tracking search` (Get-MessageTrackingLog, reference §6.1, PRODUCT §4.2/§4.8),
end to end: the real `python -m mailgate` subprocess against a real store.

Events are put in with the store's own `add_tracking` (so each filter can be checked
against known data), and once through a real node from a Pickup file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
from typing import Any, Iterator, cast

import pytest

from mailgate.store import TrackingEvent
from mailgate.store.sqlite import SqliteStore
from tests.conftest import NODE, MailgateEnv, NodeThread, drop_file, wait_for

EXCHANGE_PROPERTIES = [
    "Timestamp", "ClientIp", "ClientHostname", "ServerIp", "ServerHostname", "SourceContext",
    "ConnectorId", "Source", "EventId", "InternalMessageId", "MessageId", "Recipients",
    "RecipientStatus", "TotalBytes", "RecipientCount", "RelatedRecipientAddress", "Reference",
    "MessageSubject", "Sender", "ReturnPath", "MessageInfo", "Directionality",
]


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


# Six events over three UTC days; each has its own time, which names it in the checks.
EVENTS = {
    "receive1": TrackingEvent(
        "RECEIVE", "PICKUP", timestamp=at("2026-11-28T23:59:59"),
        message_id="<one@contoso.test>", internal_message_id=1,
        recipients=["bob@fabrikam.test", "FAX:+15551234"], sender="alice@contoso.test",
        return_path="alice@contoso.test", subject="Quarterly report, final", total_bytes=2048,
        source_context="report.eml", server_hostname="mg1.contoso.test"),
    "submit1": TrackingEvent(
        "SUBMIT", "ROUTING", timestamp=at("2026-11-29T09:59:59"),
        message_id="<one@contoso.test>", internal_message_id=1,
        recipients=["bob@fabrikam.test", "FAX:+15551234"], sender="alice@contoso.test",
        subject="Quarterly report, final"),
    "deliver1": TrackingEvent(
        "DELIVER", "GATEWAY", timestamp=at("2026-11-29T10:00:00"),
        message_id="<one@contoso.test>", internal_message_id=1,
        recipients=["FAX:+15551234"], recipient_status=["250 2.0.0 Queued for the gateway"],
        sender="alice@contoso.test", subject="Quarterly report, final",
        connector_id="Fax", source_context="20261129T100000Z-1.eml",
        message_info="2026-11-28T23:59:59.000Z", directionality="Originating"),
    "fail2": TrackingEvent(
        "FAIL", "ROUTING", timestamp=at("2026-11-29T12:00:00"),
        message_id="<two@contoso.test>", internal_message_id=2,
        recipients=["nobody@contoso.test"],
        recipient_status=["550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"],
        sender="Carol@Contoso.test", subject="Lunch?"),
    "dsn3": TrackingEvent(
        "DSN", "DSN", timestamp=at("2026-11-30T00:00:00"),
        message_id="<ndr@contoso.test>", internal_message_id=3,
        recipients=["carol@contoso.test"], sender="<>", return_path="<>",
        subject="Undeliverable: Lunch?", reference="<two@contoso.test>"),
    "receive4": TrackingEvent(
        "RECEIVE", "PICKUP", timestamp=at("2026-11-30T08:00:00"),
        message_id="<three@contoso.test>", internal_message_id=4,
        recipients=["bobby@fabrikam.test"], sender="dave@contoso.test",
        subject="re: 100% _done_"),
}
ALL = list(EVENTS)  # already in time order


def seed(env: MailgateEnv, events: list[TrackingEvent]) -> None:
    store = SqliteStore(env.data / "mailgate.db", node=NODE)
    try:
        asyncio.run(store.add_tracking(events))
    finally:
        store.close_sync()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailgateEnv]:
    env = MailgateEnv(tmp_path_factory.mktemp("tracking"))
    seed(env, [TrackingEvent(**vars(e)) for e in EVENTS.values()])
    yield env
    env.stop()


def search(env: MailgateEnv, *args: str) -> list[dict[str, Any]]:
    proc = env.cli("tracking", "search", "--json", *args)
    records: list[dict[str, Any]] = json.loads(proc.stdout)
    return records


def labels(records: list[dict[str, Any]]) -> list[str]:
    by_time = {dt.datetime.fromtimestamp(e.timestamp, dt.timezone.utc): name
               for name, e in EVENTS.items()}
    return [by_time[dt.datetime.fromisoformat(r["Timestamp"].replace("Z", "+00:00"))]
            for r in records]


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1, one `mailgate: error:` line on stderr naming the problem, nothing else."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mailgate: error: "), proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert proc.stdout == ""


# -- filters, one by one -------------------------------------------------------------------

FILTERS: list[tuple[tuple[str, ...], list[str]]] = [
    ((), ALL),
    # Times: ISO dates and date-times, naive = UTC, --end exclusive.
    (("--start", "2026-11-29"), ALL[1:]),
    (("--end", "2026-11-29"), ["receive1"]),
    (("--start", "2026-11-29 10:00", "--end", "2026-11-29 12:00"), ["deliver1"]),
    (("--start", "2026-11-29T10:00:00+01:00", "--end", "2026-11-29T10:00:00Z"),
     ["submit1"]),
    (("--start", "2026-11-30T00:00:00Z"), ["dsn3", "receive4"]),
    # What Exchange's own examples use: en-US month first, with AM/PM.
    (("--start", "11/29/2026 10:00 AM", "--end", "11/30/2026"), ["deliver1", "fail2"]),
    # Message-ID: exact, case-insensitive, angle brackets optional.
    (("--message-id", "<one@contoso.test>"), ["receive1", "submit1", "deliver1"]),
    (("--message-id", "ONE@contoso.test"), ["receive1", "submit1", "deliver1"]),
    (("--sender", "carol@contoso.test"), ["fail2"]),
    (("--sender", "<>"), ["dsn3"]),
    # Recipients: any of them, exact (bob@ is not bobby@), case-insensitive, non-SMTP too.
    (("--recipients", "BOB@fabrikam.test"), ["receive1", "submit1"]),
    (("--recipients", "fax:+15551234"), ["receive1", "submit1", "deliver1"]),
    (("--recipients", "nobody@contoso.test", "--recipients", "carol@contoso.test"),
     ["fail2", "dsn3"]),
    (("--recipients", "nobody@contoso.test,carol@contoso.test"), ["fail2", "dsn3"]),
    (("--event-id", "deliver"), ["deliver1"]),
    (("--event-id", "RECEIVE"), ["receive1", "receive4"]),
    (("--source", "dsn"), ["dsn3"]),
    (("--source", "ROUTING"), ["submit1", "fail2"]),
    (("--internal-message-id", "2"), ["fail2"]),
    # Subject: a case-insensitive part; SQL wildcards in it are plain characters.
    (("--message-subject", "LUNCH"), ["fail2", "dsn3"]),
    (("--message-subject", "100% _"), ["receive4"]),
    (("--message-subject", "%"), ["receive4"]),
    (("--message-subject", "report, fin"), ["receive1", "submit1", "deliver1"]),
    # Criteria combine with AND.
    (("--message-id", "<one@contoso.test>", "--event-id", "RECEIVE"), ["receive1"]),
    (("--recipients", "bob@fabrikam.test", "--start", "2026-11-29"), ["submit1"]),
    (("--result-size", "2"), ALL[:2]),
    (("--result-size", "unlimited"), ALL),
    (("--sender", "nobody@nowhere.test"), []),
]


@pytest.mark.parametrize("args,expected", FILTERS, ids=[" ".join(a) or "no criteria"
                                                          for a, _ in FILTERS])
def test_each_criterion_selects_the_matching_events(seeded: MailgateEnv, args: tuple[str, ...],
                                                    expected: list[str]) -> None:
    """Each Get-MessageTrackingLog criterion returns exactly the matching events, oldest
    first: times in ISO or en-US form (UTC unless an offset is given, end exclusive);
    Message-ID, sender, recipients (any of several, exact), event id and source compared
    case-insensitively; subject as a part; result size caps the list."""
    assert labels(search(seeded, *args)) == expected


# -- output -------------------------------------------------------------------------------


def test_json_uses_exchanges_property_names(seeded: MailgateEnv) -> None:
    """--json prints every event with Exchange's property names in the log's order:
    Timestamp in ISO 8601 UTC, Recipients and RecipientStatus as lists, RecipientCount,
    and null for what was not recorded."""
    [deliver] = search(seeded, "--event-id", "DELIVER")
    assert list(deliver) == EXCHANGE_PROPERTIES
    assert deliver["Timestamp"] == "2026-11-29T10:00:00.000Z"
    assert deliver["EventId"] == "DELIVER" and deliver["Source"] == "GATEWAY"
    assert deliver["Recipients"] == ["FAX:+15551234"]
    assert deliver["RecipientStatus"] == ["250 2.0.0 Queued for the gateway"]
    assert deliver["RecipientCount"] == 1
    assert deliver["ConnectorId"] == "Fax"
    assert deliver["SourceContext"] == "20261129T100000Z-1.eml"
    assert deliver["MessageInfo"] == "2026-11-28T23:59:59.000Z"
    assert deliver["Directionality"] == "Originating"
    assert deliver["InternalMessageId"] == 1
    assert deliver["MessageSubject"] == "Quarterly report, final"
    assert deliver["ClientIp"] is None and deliver["TotalBytes"] is None
    [dsn] = search(seeded, "--event-id", "DSN")
    assert dsn["Reference"] == "<two@contoso.test>" and dsn["ReturnPath"] == "<>"
    [receive] = search(seeded, "--event-id", "RECEIVE", "--result-size", "1")
    assert receive["TotalBytes"] == 2048 and receive["ServerHostname"] == "mg1.contoso.test"
    assert receive["RecipientCount"] == 2


def test_table_shows_the_main_columns(seeded: MailgateEnv) -> None:
    """Without --json the result is a table with Timestamp, EventId, Source, Sender,
    Recipients and MessageSubject, one row per event."""
    out = seeded.cli("tracking", "search", "--message-id", "<one@contoso.test>").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["Timestamp", "EventId", "Source", "Sender", "Recipients",
                                "MessageSubject"]
    assert len(lines) == 4
    assert "2026-11-28T23:59:59.000Z" in lines[1] and "RECEIVE" in lines[1]
    assert "{bob@fabrikam.test, FAX:+15551234}" in lines[1]
    assert "Quarterly report, final" in lines[1]
    assert "DELIVER" in lines[3] and "GATEWAY" in lines[3]


def test_result_size_defaults_to_1000(env: MailgateEnv) -> None:
    """Like Get-MessageTrackingLog, at most 1000 events come back unless --result-size
    says otherwise (a number or unlimited)."""
    base = at("2026-11-29T00:00:00")
    seed(env, [TrackingEvent("RECEIVE", "PICKUP", timestamp=base + i,
                             message_id=f"<m{i}@contoso.test>") for i in range(1001)])
    first = search(env)
    assert len(first) == 1000
    assert first[0]["MessageId"] == "<m0@contoso.test>"
    assert first[-1]["MessageId"] == "<m999@contoso.test>"
    assert len(search(env, "--result-size", "unlimited")) == 1001
    assert len(search(env, "--result-size", "1001")) == 1001


# -- refusals ------------------------------------------------------------------------------

BAD: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("--start", "yesterday"), ("--start", "yesterday")),
    (("--end", "2026-02-30"), ("--end", "2026-02-30")),
    (("--start", "2026-13-01 10:00"), ("--start",)),
    (("--start", "2026-11-30", "--end", "2026-11-29"), ("--start", "before --end")),
    (("--start", "2026-11-29", "--end", "2026-11-29T00:00:00Z"), ("--start", "--end")),
    (("--event-id", "DELIVERED"), ("event id", "DELIVERED", "DELIVER")),
    (("--result-size", "0"), ("--result-size",)),
    (("--result-size", "lots"), ("--result-size",)),
    (("--internal-message-id", "x1"), ("--internal-message-id",)),
    (("--bogus",), ("--bogus",)),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_error_line(seeded: MailgateEnv, args: tuple[str, ...],
                                     needles: tuple[str, ...]) -> None:
    """An unparseable time, a start not before the end, an unknown event id, or a bad
    result size or id is refused with one `mailgate: error:` line and exit status 1."""
    refused(seeded.cli("tracking", "search", *args, check=False), *needles)


# -- through a real node -------------------------------------------------------------------


def test_a_pickup_message_is_found_by_its_message_id(demo_env: MailgateEnv,
                                                     node: NodeThread) -> None:
    """A message dropped into the Pickup directory of a running node can be followed with
    `tracking search --message-id`: RECEIVE from PICKUP, SUBMIT from ROUTING, DELIVER from
    STOREDRIVER, all with the same InternalMessageId."""
    drop_file(demo_env.pickup, "track.eml",
              b"From: alice@contoso.test\nTo: alice@contoso.test\nSubject: follow me\n"
              b"Message-ID: <follow@contoso.test>\n\nHi.\n")

    def delivered() -> list[dict[str, Any]] | None:
        found = search(demo_env, "--message-id", "follow@contoso.test")
        return found if any(r["EventId"] == "DELIVER" for r in found) else None

    records = cast(list[dict[str, Any]], wait_for(delivered, what="the DELIVER event"))
    steps = [(r["EventId"], r["Source"]) for r in records]
    assert steps == [("RECEIVE", "PICKUP"), ("SUBMIT", "ROUTING"), ("DELIVER", "STOREDRIVER")]
    assert {r["InternalMessageId"] for r in records} == {records[0]["InternalMessageId"]}
    assert records[0]["SourceContext"] == "track.eml"
    assert records[0]["MessageSubject"] == "follow me"
    assert all(r["Recipients"] == ["alice@contoso.test"] for r in records)
    subject_only = search(demo_env, "--message-subject", "FOLLOW", "--event-id", "deliver")
    assert [r["MessageId"] for r in subject_only] == ["<follow@contoso.test>"]


def test_running_node_writes_the_csv_log_and_follows_setting_changes(
        demo_env: MailgateEnv) -> None:
    """A running node writes its events to var/logs/MessageTracking/MSGTRK<date>-1.LOG by
    default; `transport-service set --message-tracking-log-path` moves the log while the
    node runs, and `$null` stops it."""
    from mailgate.tracking_log import TrackingLogService

    env = demo_env
    node = NodeThread(env)
    try:
        service: TrackingLogService = node.node.tracking_log
        service.check_every = 0.1
        drop_file(env.pickup, "a.eml", b"From: alice@contoso.test\nTo: alice@contoso.test\n"
                                       b"Subject: logged\nMessage-ID: <csv1@contoso.test>\n\nHi.\n")
        default = env.data / "logs" / "MessageTracking"

        def logged(folder: Any, needle: str) -> bool:
            return any(needle in p.read_text() for p in folder.glob("MSGTRK*.LOG"))
        wait_for(lambda: default.is_dir() and logged(default, "<csv1@contoso.test>"),
                 what="the CSV log line")
        [log_file] = default.glob("MSGTRK*.LOG")
        assert log_file.read_text().startswith("#Software: mailgate")
        assert ",DELIVER," in log_file.read_text()

        moved = env.root / "elsewhere"
        env.cli("transport-service", "set", "--message-tracking-log-path", str(moved))
        drop_file(env.pickup, "b.eml", b"From: alice@contoso.test\nTo: alice@contoso.test\n"
                                       b"Subject: moved\nMessage-ID: <csv2@contoso.test>\n\nHi.\n")
        wait_for(lambda: moved.is_dir() and logged(moved, "<csv2@contoso.test>"),
                 what="the line in the new folder")
        env.cli("transport-service", "set", "--message-tracking-log-path", "$null")
        wait_for(lambda: service.writer is None, what="the log to stop")
    finally:
        node.stop()
