"""A small real DNS server for tests: UDP on 127.0.0.1 (an ephemeral port), answering from a
dict of records with dnspython's dns.message, in a background thread.

    with DnsServer({"fabrikam.test": [("MX", "10 mx.fabrikam.test.")],
                    "mx.fabrikam.test": [("A", "127.0.0.1")]}) as dns:
        env.cli("transport-service", "set", "--external-dns-servers", dns.address)

A name with records of other types answers NOERROR without answers (no MX: RFC 5321's
implicit MX); an unknown name answers NXDOMAIN; a name in `servfail` answers SERVFAIL.
`queries` lists (name, type) as asked. Records can be changed while it runs.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[str, list[tuple[str, str]]],
                 servfail: tuple[str, ...] = ()) -> None:
        self.records = {k.lower().rstrip("."): list(v) for k, v in records.items()}
        self.servfail = {s.lower().rstrip(".") for s in servfail}
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        """As ExternalDnsServers takes it: `127.0.0.1:<port>`."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - not a DNS query: no answer
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        found = self.records.get(name)
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        values = [v for t, v in found if t.upper() == rdtype]
        if values:
            response.answer.append(dns.rrset.from_text(q.name, 60, dns.rdataclass.IN, rdtype,
                                                       *values))
        return response.to_wire()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            answer = self._answer(wire)
            if answer is not None:
                try:
                    self._sock.sendto(answer, peer)
                except OSError:
                    pass
