"""Send connectors end to end (issue #4 scope 4 and 5): the real CLI and the real
`mailgate serve` process, delivering from the Pickup and Replay directories to real SMTP
peers on loopback: Postfix's smtp-sink (extracted by .ci/run, tests/peers.py), an aiosmtpd
next hop, a raw-capturing server; MX records from a real UDP DNS server set as the node's
ExternalDnsServers."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any, cast

import pytest

from tests.conftest import MailgateEnv, drop_file, wait_for
from tests.dnsserver import DnsServer
from tests.smtp import add_connector
from tests.e2e.test_queue_engine import recipient_blocks, reports
from tests.peers import (
    AiosmtpdPeer,
    RawPeer,
    SmtpSink,
    assert_clean_wire,
    free_port,
    normalised,
    tool,
    tool_env,
    unstuff,
)

ALICE = "alice@contoso.test"


def connectors(env: MailgateEnv) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]],
                json.loads(env.cli("send-connector", "get", "--json").stdout))


def events(env: MailgateEnv, *args: str) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]],
                json.loads(env.cli("tracking", "search", *args, "--json").stdout))


def smtp_queues(env: MailgateEnv) -> list[dict[str, Any]]:
    return [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
            if q["DeliveryType"] in ("DnsConnectorDelivery", "SmartHostConnectorDelivery")]


def pickup(env: MailgateEnv, name: str, to: str, subject: str, body: bytes = b"Hello.\n",
           sender: str = ALICE) -> None:
    drop_file(env.pickup, name,
              f"From: {sender}\nTo: {to}\nSubject: {subject}\n\n".encode() + body)


# -- the CLI --------------------------------------------------------------------------------

def test_send_connector_cli_round_trip(demo_env: MailgateEnv) -> None:
    """new (DNS, then smart hosts with TLS and auth), get as table and JSON, set (address
    spaces added and removed, smart hosts replaced, back to DNS), remove. The password is
    never an option: only the name of its environment variable is stored and shown."""
    env = demo_env
    out = env.cli("send-connector", "new", "--name", "Internet", "--address-spaces", "*",
                  "--comment", "all the rest").stdout
    assert "Internet" in out and "SMTP:*;1" in out and "opportunistic" in out
    made = env.cli("send-connector", "new", "--name", "Partner", "--address-spaces",
                   "fabrikam.test;5,*.fabrikam.test", "--smart-hosts", "Relay.Fabrikam.TEST",
                   "--smart-hosts", "10.0.0.1:2525,[IPv6:2001:db8::1]", "--port", "587",
                   "--tls", "Required", "--smart-host-auth-mechanism", "basicauthrequiretls",
                   "--auth-user", "gw", "--auth-password-env", "PARTNER_SMTP_PASSWORD",
                   "--fqdn", "Out.Contoso.TEST", "--max-message-size", "20MB",
                   "--smtp-max-messages-per-connection", "50",
                   "--connection-inactivity-timeout", "5m", "--json")
    c = json.loads(made.stdout)
    assert c["AddressSpaces"] == ["SMTP:fabrikam.test;5", "SMTP:*.fabrikam.test;1"]
    assert c["SmartHosts"] == ["relay.fabrikam.test", "[10.0.0.1]:2525", "[2001:db8::1]"]
    assert c["DNSRoutingEnabled"] is False and c["Port"] == 587 and c["Tls"] == "required"
    assert c["SmartHostAuthMechanism"] == "BasicAuthRequireTLS" and c["AuthUser"] == "gw"
    assert c["AuthPasswordEnv"] == "PARTNER_SMTP_PASSWORD" and c["Fqdn"] == "out.contoso.test"
    assert c["MaxMessageSize"] == 20 * 1024 * 1024
    assert c["SmtpMaxMessagesPerConnection"] == 50 and c["ConnectionInactivityTimeout"] == 300
    assert c["SourceTransportServers"] == ["testnode"] and c["Enabled"] is True
    assert c["TlsAuthLevel"] == "EncryptionOnly" and c["TlsDomain"] is None
    assert "PARTNER_SMTP_PASSWORD is not set here" in made.stderr   # a warning, not an error
    c = json.loads(env.cli("send-connector", "set", "Partner", "--tls-auth-level",
                           "domainvalidation", "--tls-domain", "*.Fabrikam.TEST", "--json").stdout)
    assert (c["TlsAuthLevel"], c["TlsDomain"]) == ("DomainValidation", "*.fabrikam.test")
    c = json.loads(env.cli("send-connector", "set", "Partner", "--tls-domain", "",
                           "--tls-auth-level", "EncryptionOnly", "--json").stdout)
    assert (c["TlsAuthLevel"], c["TlsDomain"]) == ("EncryptionOnly", None)

    table = env.cli("send-connector", "get").stdout
    assert table.index("Internet") < table.index("Partner")
    assert "{relay.fabrikam.test, [10.0.0.1]:2525, [2001:db8::1]}" in table

    c = json.loads(env.cli("send-connector", "set", "testnode\\Partner",
                           "--add-address-spaces", "contoso-partner.test",
                           "--remove-address-spaces", "*.fabrikam.test",
                           "--smart-hosts", "relay2.fabrikam.test", "--enabled", "false",
                           "--json").stdout)
    assert c["AddressSpaces"] == ["SMTP:fabrikam.test;5", "SMTP:contoso-partner.test;1"]
    assert c["SmartHosts"] == ["relay2.fabrikam.test"] and c["Enabled"] is False
    c = json.loads(env.cli("send-connector", "set", c["Guid"], "--dns-routing-enabled", "true",
                           "--smart-host-auth-mechanism", "None", "--json").stdout)
    assert c["SmartHosts"] == [] and c["DNSRoutingEnabled"] is True
    [got] = json.loads(env.cli("send-connector", "get", "Partner", "--json").stdout)
    assert got == c

    env.cli("transport-service", "set", "--external-dns-servers", "192.0.2.53",
            "--external-dns-servers", "127.0.0.1:5353,[::1]:53")
    ts = json.loads(env.cli("transport-service", "get", "--json").stdout)
    assert ts["ExternalDnsServers"] == ["192.0.2.53", "127.0.0.1:5353", "[::1]:53"]
    env.cli("transport-service", "set", "--external-dns-servers", "$null")
    assert json.loads(env.cli("transport-service", "get", "--json").stdout)[
        "ExternalDnsServers"] == []

    assert env.cli("send-connector", "remove", "Partner").stdout.strip() == \
        "removed Send connector Partner"
    assert [x["Name"] for x in connectors(env)] == ["Internet"]


@pytest.mark.parametrize("args, message", [
    (["new", "--name", "Fax", "--address-spaces", "FAX:*"],
     "a Send connector takes SMTP address spaces only"),
    (["new", "--name", "X", "--address-spaces", "*contoso.com"], "*contoso.com"),
    (["new", "--name", "X", "--address-spaces", "*", "--smart-hosts", "relay:0"],
     "the port must be a number from 1 to 65535"),
    (["new", "--name", "X", "--address-spaces", "*", "--smart-hosts", "2001:db8::1"],
     "write an IPv6 address in brackets"),
    (["new", "--name", "X", "--address-spaces", "*", "--port", "70000"],
     "--port must be between 1 and 65535"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls", "always"], "--tls"),
    (["new", "--name", "X", "--address-spaces", "*", "--smart-host-auth-mechanism",
      "BasicAuth"], "applies to smart hosts only"),
    (["new", "--name", "X", "--address-spaces", "*", "--smart-hosts", "r.test",
      "--smart-host-auth-mechanism", "BasicAuth", "--auth-user", "u"],
     "needs --auth-user and --auth-password-env"),
    (["new", "--name", "X", "--address-spaces", "*", "--smart-hosts", "r.test",
      "--smart-host-auth-mechanism", "BasicAuthRequireTLS", "--auth-user", "u",
      "--auth-password-env", "PW", "--tls", "none"], "needs --tls opportunistic or required"),
    (["new", "--name", "X", "--address-spaces", "*", "--auth-password-env", "MY-PASSWORD"],
     "the name of an environment variable"),
    (["new", "--name", "X", "--address-spaces", "*", "--fqdn", "bad name"],
     "--fqdn: 'bad name' is not a valid host name"),
    (["new", "--name", "X", "--address-spaces", "*", "--smtp-max-messages-per-connection",
      "0"], "between 1 and 100000"),
    (["new", "--name", "X", "--address-spaces", "*", "--connection-inactivity-timeout",
      "2d"], "--connection-inactivity-timeout must be between"),
    (["new", "--name", "X", "--address-spaces", "*", "--dns-routing-enabled", "false"],
     "needs --smart-hosts"),
    (["new", "--name", "Internet", "--address-spaces", "*"],
     "a Send connector with name 'internet' already exists"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls-auth-level",
      "CertificateValidation"], "needs --tls required"),
    (["set", "Internet", "--tls", "required", "--tls-auth-level", "CertificateValidation",
      "--tls-domain", "fabrikam.test"], "--tls-domain applies with --tls-auth-level"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls", "required",
      "--tls-auth-level", "DomainValidation", "--tls-domain", "bad domain"],
     "--tls-domain must be a domain"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls-ca-file", "/nonexistent.pem"],
     "/nonexistent.pem does not exist"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls-ca-file", "/etc/passwd"],
     "holds no usable PEM certificate"),
    (["new", "--name", "X", "--address-spaces", "*", "--tls-auth-level", "Strict"],
     "--tls-auth-level"),
    (["set", "Nope", "--port", "26"], "Send connector 'Nope' was not found"),
    (["set", "Internet", "--remove-address-spaces", "contoso.com"], "is not in the list"),
])
def test_send_connector_bad_input_is_one_line_and_changes_nothing(
        demo_env: MailgateEnv, args: list[str], message: str) -> None:
    env = demo_env
    env.cli("send-connector", "new", "--name", "Internet", "--address-spaces", "*")
    before = connectors(env)
    proc = env.cli("send-connector", *args, check=False)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mailgate: error: ")
    assert message in proc.stderr
    assert connectors(env) == before


def test_external_dns_servers_bad_input(demo_env: MailgateEnv) -> None:
    env = demo_env
    for bad in ("dns.example.net", "127.0.0.1:99999", "[::1"):
        proc = env.cli("transport-service", "set", "--external-dns-servers", bad, check=False)
        assert proc.returncode == 1 and "--external-dns-servers" in proc.stderr
        assert proc.stderr.count("\n") == 1
    assert json.loads(env.cli("transport-service", "get", "--json").stdout)[
        "ExternalDnsServers"] == []


# -- delivery through the running node ------------------------------------------------------

def test_pickup_to_smtp_sink_through_a_smart_host(demo_env: MailgateEnv) -> None:
    """The user story's last leg: a Pickup file for bob@fabrikam.test goes through a smart
    host Send connector to Postfix's smtp-sink, which keeps it; read back, it is the
    message with mailgate's Received line, sent from alice with BODY=8BITMIME (smtp-sink
    offers 8BITMIME, not SIZE) and EHLO as the connector's Fqdn; tracking has SEND (source SMTP) for the connector."""
    env = demo_env
    with SmtpSink() as sink:
        env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
                "--smart-hosts", "127.0.0.1", "--port", str(sink.port), "--fqdn",
                "gw.contoso.test")
        env.start()
        pickup(env, "a.eml", "bob@fabrikam.test, carol@fabrikam.test", "to the sink",
               b"Hello Bob.\n.leading dot\nbye\n")
        [m] = cast(list[Any], wait_for(sink.messages, what="the message in smtp-sink"))
        assert m.recipients == ["bob@fabrikam.test", "carol@fabrikam.test"]
        assert m.mail_args.split()[0] == f"<{ALICE}>"
        assert m.mail_args.split()[1:] == ["BODY=8BITMIME"]
        helo = [line for line in m.path.read_bytes().split(b"\n")
                if line.startswith(b"X-Helo-Args: ")]
        assert helo == [b"X-Helo-Args: gw.contoso.test"]
        assert re.search(rb"^Received: from localhost by .* with mailgate Pickup;", m.data,
                         re.M)
        assert b"\nSubject: to the sink\n" in m.data
        assert b"\n\nHello Bob.\n.leading dot\nbye\n" in m.data
        send = cast(list[dict[str, Any]], wait_for(
            lambda: events(env, "--event-id", "SEND"), what="the SEND event"))
        assert send[0]["Source"] == "SMTP" and send[0]["ConnectorId"] == "Outbound"
        assert send[0]["SourceContext"] == f"[127.0.0.1]:{sink.port}"
        assert sorted(send[0]["Recipients"]) == ["bob@fabrikam.test", "carol@fabrikam.test"]
        wait_for(lambda: not any(q["MessageCount"] for q in smtp_queues(env)),
                 what="an empty queue")
        [q] = smtp_queues(env)
        assert q["DeliveryType"] == "SmartHostConnectorDelivery"
        assert q["NextHopDomain"] == "[127.0.0.1]"


def test_dns_mx_routing_through_external_dns_servers(demo_env: MailgateEnv) -> None:
    """ExternalDnsServers points the node at a test DNS server: fabrikam.test's MX is
    mx.fabrikam.test at 127.0.0.1, where an aiosmtpd next hop listens on the connector's
    port. Mail for two domains gets a DnsConnectorDelivery queue per domain."""
    env = demo_env
    zone = {"fabrikam.test": [("MX", "10 mx.fabrikam.test.")],
            "mx.fabrikam.test": [("A", "127.0.0.1")],
            "tailspin.test": [("A", "127.0.0.1")]}          # no MX: the A record itself
    with DnsServer(zone) as dns, AiosmtpdPeer() as peer:
        env.cli("transport-service", "set", "--external-dns-servers", dns.address)
        env.cli("send-connector", "new", "--name", "Internet", "--address-spaces", "*",
                "--port", str(peer.port))
        env.start()
        pickup(env, "a.eml", "bob@fabrikam.test, ann@tailspin.test", "via mx")
        wait_for(lambda: len(peer.messages) == 2, what="two deliveries")
        assert sorted(m.rcpt_tos[0] for m in peer.messages) == ["ann@tailspin.test",
                                                               "bob@fabrikam.test"]
        assert ("fabrikam.test", "MX") in dns.queries and ("tailspin.test", "A") in dns.queries
        assert sorted(q["NextHopDomain"] for q in smtp_queues(env)) == ["fabrikam.test",
                                                                       "tailspin.test"]
        hosts = {e["Recipients"][0]: e["ServerHostname"]
                 for e in events(env, "--event-id", "SEND")}
        assert hosts == {"bob@fabrikam.test": "mx.fabrikam.test",
                         "ann@tailspin.test": "tailspin.test"}


def test_a_next_hop_that_is_this_node_is_a_routing_loop(demo_env: MailgateEnv) -> None:
    """The node listens on 127.0.0.1:P and a peer on 127.0.0.2:P. fabrikam.test's best MX
    is the peer (this node is only MX 20): delivered there. tailspin.test's best MX is this
    node: 554 5.4.6 NDR, nothing sent. A smart host that is this node: the same."""
    env = demo_env
    port = free_port()
    add_connector(env, port)
    zone = {"fabrikam.test": [("MX", "10 mx1.fabrikam.test."), ("MX", "20 me.test.")],
            "tailspin.test": [("MX", "10 me.test."), ("MX", "20 mx1.fabrikam.test.")],
            "mx1.fabrikam.test": [("A", "127.0.0.2")],
            "me.test": [("A", "127.0.0.1")]}
    with DnsServer(zone) as dns, AiosmtpdPeer(host="127.0.0.2", port=port) as peer:
        env.cli("transport-service", "set", "--external-dns-servers", dns.address)
        env.cli("send-connector", "new", "--name", "Internet", "--address-spaces", "*",
                "--port", str(port))
        env.start()
        pickup(env, "a.eml", "bob@fabrikam.test, ann@tailspin.test", "loop")
        wait_for(lambda: reports(env), what="the NDR for tailspin.test")
        [ndr] = reports(env)
        [block] = recipient_blocks(ndr)
        assert block["Final-Recipient"] == "rfc822; ann@tailspin.test"
        assert block["Status"] == "5.4.6" and "Routing loop" in block["Diagnostic-Code"]
        wait_for(lambda: peer.messages, what="the delivery to the better MX")
        assert [m.rcpt_tos for m in peer.messages] == [["bob@fabrikam.test"]]
        env.cli("send-connector", "set", "Internet", "--smart-hosts", "127.0.0.1")
        time.sleep(1.5)
        pickup(env, "b.eml", "carl@fabrikam.test", "smart host loop")
        wait_for(lambda: len(reports(env)) == 2, what="the NDR for the smart host loop")
        assert len(peer.messages) == 1


def test_dead_next_hop_puts_the_queue_in_retry(demo_env: MailgateEnv) -> None:
    """Nothing listens at the smart host: the queue goes to Retry with a LastError naming
    the host and the reason, the message stays queued (DEFER, source SMTP), and nothing is
    reported to the sender."""
    env = demo_env
    port = free_port()
    env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
            "--smart-hosts", f"[127.0.0.1]:{port}")
    env.start()
    pickup(env, "a.eml", "bob@fabrikam.test", "nobody home")

    def in_retry() -> dict[str, Any] | None:
        found = [q for q in smtp_queues(env) if q["Status"] == "Retry"]
        return found[0] if found else None
    q = cast(dict[str, Any], wait_for(in_retry, what="the queue in Retry"))
    assert q["MessageCount"] == 1 and q["NextRetryTime"]
    assert q["LastError"].startswith("451 4.4.1 ")
    assert f"[127.0.0.1]:{port}: Connection refused" in q["LastError"]
    [defer] = events(env, "--event-id", "DEFER")
    assert defer["Source"] == "SMTP" and defer["Recipients"] == ["bob@fabrikam.test"]
    time.sleep(0.5)
    assert reports(env) == []


def test_ndr_rules_against_smtp_sink_rejecting_rcpt(demo_env: MailgateEnv) -> None:
    """T13 NDR rules: smtp-sink `-f RCPT` refuses every recipient with a 5xx. (a) A normal
    sender (alice) gets exactly one NDR, from the null sender, with the sink's reply; (b) a
    null-sender message (a Replay file with X-Sender: <>) gets none, only a FAIL event;
    (c) an external sender's NDR goes out through the same connector, is refused too, and
    no NDR answers that NDR."""
    env = demo_env
    with SmtpSink("-f", "RCPT") as sink:
        env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
                "--smart-hosts", "127.0.0.1", "--port", str(sink.port))
        env.start()
        pickup(env, "a.eml", "bob@fabrikam.test", "normal sender")
        drop_file(env.data / "replay", "b.eml",
                  b"X-Sender: <>\r\nX-Receiver: <carol@fabrikam.test>\r\n"
                  b"From: mailer-daemon@contoso.test\r\nTo: carol@fabrikam.test\r\n"
                  b"Subject: null sender\r\n\r\nA bounce.\r\n")
        pickup(env, "c.eml", "dave@fabrikam.test", "external sender",
               sender="erin@tailspin.test")
        [ndr] = cast(list[Any], wait_for(lambda: reports(env), what="alice's NDR"))
        fails = cast(list[dict[str, Any]], wait_for(
            lambda: len(found := events(env, "--event-id", "FAIL", "--source", "SMTP")) >= 4
            and found, what="four FAIL events"))
        time.sleep(1.5)
        assert len(reports(env)) == 1
    assert ndr["From"] == "Mail Delivery System <postmaster@contoso.test>"
    [block] = recipient_blocks(ndr)
    assert block["Final-Recipient"] == "rfc822; bob@fabrikam.test"
    assert block["Status"].startswith("5.") and "in reply to RCPT TO" in \
        block["Diagnostic-Code"]
    failed = sorted(r for e in fails for r in e["Recipients"])
    assert failed == ["bob@fabrikam.test", "carol@fabrikam.test", "dave@fabrikam.test",
                      "erin@tailspin.test"]
    dsns = events(env, "--event-id", "DSN")
    assert sorted(e["Recipients"][0] for e in dsns) == [ALICE, "erin@tailspin.test"]
    assert len(events(env, "--event-id", "FAIL", "--source", "SMTP")) == 4


def test_outbound_smuggling_from_pickup(demo_env: MailgateEnv) -> None:
    """T18 outbound smuggling (we are service A): a Pickup message whose body holds bare
    LF, bare CR, "\\n.\\n", "\\r\\n.\\n", "\\r.\\r\\n" and a fake end of data followed by
    MAIL FROM reaches a raw-capturing next hop in one transaction, with no LF without CR,
    no CR without LF and no lone "." line but the terminator; the body is intact except
    for line endings."""
    env = demo_env
    body = (b"line1\nX-Injected: bare LF\r\nbody\n.\nMAIL FROM:<smuggled@example.test>\r\n"
            b"line2\r.\r\nRCPT TO:<x@example.test>\r\n\r\n.\nDATA\r\n.\r\n"
            b"\r\r\n.\r\r\nbare CR\rend")
    with RawPeer() as peer:
        env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
                "--smart-hosts", "127.0.0.1", "--port", str(peer.port), "--tls", "none")
        env.start()
        drop_file(env.pickup, "s.eml",
                  f"From: {ALICE}\r\nTo: bob@fabrikam.test\r\nSubject: smuggle\r\n\r\n"
                  .encode() + body)
        wait_for(lambda: peer.data, what="the data")
        time.sleep(0.5)
    [data] = peer.data
    assert_clean_wire(data)
    assert unstuff(data).endswith(b"\r\n\r\n" + normalised(body))
    assert [c.split(b":")[0].upper() for c in peer.commands
            if c.upper().startswith((b"MAIL", b"RCPT"))] == [b"MAIL FROM", b"RCPT TO"]
    assert not any(b"smuggled" in c for c in peer.commands)


def test_dsn_parameters_reach_smtp_sink(demo_env: MailgateEnv) -> None:
    """smtp-sink offers DSN: a Replay file's RET, ENVID, NOTIFY and ORCPT are passed on
    (ENVID as xtext) and mailgate sends no success DSN itself."""
    env = demo_env
    with SmtpSink() as sink:
        env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
                "--smart-hosts", "127.0.0.1", "--port", str(sink.port))
        env.start()
        drop_file(env.data / "replay", "d.eml",
                  f"X-Sender: <{ALICE}> RET=FULL ENVID=QQ+2B1\r\n"
                  "X-Receiver: <bob@fabrikam.test> NOTIFY=SUCCESS,DELAY "
                  "ORCPT=rfc822;bob+2Bx@fabrikam.test\r\n"
                  f"From: {ALICE}\r\nTo: bob@fabrikam.test\r\nSubject: dsn\r\n\r\nBody.\r\n"
                  .encode())
        [m] = cast(list[Any], wait_for(sink.messages, what="the message"))
        time.sleep(1.0)
    assert "RET=FULL" in m.mail_args.split() and "ENVID=QQ+2B1" in m.mail_args.split()
    assert m.rcpt_args == ["<bob@fabrikam.test> NOTIFY=SUCCESS,DELAY "
                           "ORCPT=rfc822;bob+2Bx@fabrikam.test"]
    assert reports(env) == []


def test_the_test_peers_run() -> None:
    """The SMTP tools .ci/run provides work here: Postfix's smtp-source (extracted, with
    its libraries) and swaks both deliver into smtp-sink."""
    with SmtpSink() as sink:
        proc = subprocess.run([tool("smtp-source"), "-m", "3", "-s", "1", "-f",
                               "load@contoso.test", "-t", "sink@fabrikam.test",
                               f"127.0.0.1:{sink.port}"], env=tool_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run([tool("swaks"), "--server", "127.0.0.1", "--port",
                               str(sink.port), "--from", ALICE, "--to", "bob@fabrikam.test",
                               "--header", "Subject: from swaks"], env=tool_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = cast(list[Any], wait_for(lambda: len(sink.messages()) == 4 and
                                         sink.messages(), what="four dumps"))
    assert sorted(m.recipients[0] for m in found) == ["bob@fabrikam.test"] + [
        "sink@fabrikam.test"] * 3
