"""The SSRF lab: run inside a network namespace of its own (tests/test_ssrf.py makes it), where
every address below is bound on the namespace's loopback interface, nothing routes out, and
/etc/resolv.conf names the lab's own DNS server (127.0.0.1:53).

It binds a counting listener on each internal address, one HTTPS "merchant"/"processor" server on
11.1.1.1 (a public address inside the namespace only; its certificate is from a CA made here and
trusted through SSL_CERT_FILE, as an operator would), and a DNS server whose answers the lab
scripts, including one that changes between the first lookup and the next (DNS rebinding).
Then it drives the real webhook sender and the real forwarding proxy in production mode and
prints, per case, what they returned and how many connections each listener accepted.

    make_tls(DIR)  # first, outside: SSL_CERT_FILE must name the CA before aiohttp is imported
    SSL_CERT_FILE=DIR/ca.pem ip netns exec NS python -m tests.support.ssrf_lab DIR OUT.json
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PORT = 8443
PUBLIC = "11.1.1.1"
#: Bound on the namespace's loopback, each with a listener that counts what it accepts.
INTERNAL = (
    "127.0.0.1",
    "127.0.0.2",
    "::1",
    "169.254.169.254",
    "10.0.0.7",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",
    "192.0.0.170",
    "fd00::7",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "64:ff9b::7f00:1",
)
#: What the namespace's interface carries (the test adds them); the public one is the server.
ADDRESSES = (PUBLIC, *INTERNAL)

#: The lab's DNS: each name's answers in turn (the last one repeats); one lookup uses one turn.
ZONE: dict[str, list[list[str]]] = {
    "hooks.test": [[PUBLIC]],
    "psp.hooks.test": [[PUBLIC]],
    "metadata.hooks.test": [["169.254.169.254"]],
    "internal.hooks.test": [["10.0.0.7"]],
    "internal6.hooks.test": [["fd00::7"]],
    "mapped.hooks.test": [["::ffff:127.0.0.1"]],
    "sixtofour.hooks.test": [["2002:7f00:1::1"]],
    "mixed.hooks.test": [[PUBLIC, "10.0.0.7"]],
    "rebind.hooks.test": [[PUBLIC], ["127.0.0.1"]],
    "rebind-metadata.hooks.test": [[PUBLIC], ["169.254.169.254"]],
    "psp-rebind.hooks.test": [[PUBLIC], ["127.0.0.1"]],
    "psp-metadata.hooks.test": [["169.254.169.254"]],
}

#: Webhook URLs a merchant might register that must never be connected to, in production.
BLOCKED_WEBHOOK_URLS = (
    "https://127.0.0.1:8443/hooks",
    "https://127.0.0.2:8443/hooks",
    "https://[::1]:8443/hooks",
    "https://localhost:8443/hooks",
    "https://169.254.169.254:8443/latest/meta-data/",
    "https://10.0.0.7:8443/hooks",
    "https://172.16.5.4:8443/hooks",
    "https://192.168.1.1:8443/hooks",
    "https://100.64.0.1:8443/hooks",  # carrier-grade NAT
    "https://192.0.0.170:8443/hooks",  # IETF protocol assignments (NAT64 discovery)
    "https://[fd00::7]:8443/hooks",  # unique local
    "https://0.0.0.0:8443/hooks",  # connects to this host
    "https://[::]:8443/hooks",
    "https://[::ffff:127.0.0.1]:8443/hooks",  # IPv4-mapped
    "https://[::ffff:a9fe:a9fe]:8443/hooks",  # IPv4-mapped metadata, hex
    "https://[2002:7f00:1::1]:8443/hooks",  # 6to4 around 127.0.0.1
    "https://[2002:a9fe:a9fe::1]:8443/hooks",  # 6to4 around the metadata address
    "https://[64:ff9b::7f00:1]:8443/hooks",  # NAT64 around 127.0.0.1
    "https://2130706433:8443/hooks",  # 127.0.0.1, decimal
    "https://2852039166:8443/latest/meta-data/",  # 169.254.169.254, decimal
    "https://0177.0.0.1:8443/hooks",  # octal
    "https://0x7f.0.0.1:8443/hooks",  # hex
    "https://0x7f000001:8443/hooks",
    "https://127.1:8443/hooks",  # short form
    "https://0251.0376.0251.0376:8443/latest/meta-data/",
    "https://metadata.hooks.test:8443/latest/meta-data/",  # a name for the metadata address
    "https://internal.hooks.test:8443/hooks",
    "https://internal6.hooks.test:8443/hooks",
    "https://mapped.hooks.test:8443/hooks",
    "https://sixtofour.hooks.test:8443/hooks",
    "https://mixed.hooks.test:8443/hooks",  # one public address, one private: refused
    "http://hooks.test:8443/hooks",  # public, but plain http
)

#: Where the public server redirects (status, Location): none of them may be followed.
REDIRECTS = (
    (307, "https://127.0.0.1:8443/hooks"),
    (308, "http://127.0.0.2:8443/hooks"),
    (302, "https://[::1]:8443/hooks"),
    (301, "http://169.254.169.254:8443/latest/meta-data/"),
    (303, "https://10.0.0.7:8443/hooks"),
    (307, "https://[fd00::7]:8443/hooks"),
    (307, "https://internal.hooks.test:8443/hooks"),
    (302, "http://2130706433:8443/hooks"),
)

TEST_CARD = "4242424242424242"  # the documented Visa test card


# --- certificates ----------------------------------------------------------------------------


def make_tls(directory: Path) -> None:
    """A CA (directory/ca.pem, for SSL_CERT_FILE) and the public server's key and certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tessera SSRF lab CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(name) for name in ZONE] + [x509.IPAddress(ipaddress.ip_address(PUBLIC))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def server_context(directory: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context


# --- the listeners, the public server and the DNS server ------------------------------------


class Taps:
    """A listener on every internal address; counts accepted connections and closes them."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        for address in INTERNAL:

            async def accepted(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str = address
            ) -> None:
                self.hits[address] += 1
                writer.close()

            self.servers.append(await asyncio.start_server(accepted, address, PORT))

    def snapshot(self) -> dict[str, int]:
        return {address: self.hits[address] for address in INTERNAL}


class PublicServer:
    """The merchant's (or processor's) HTTPS server: /ok accepts, /redirect/N answers the Nth
    entry of REDIRECTS. Records each request's path and Host header."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def start(self, context: ssl.SSLContext) -> web.AppRunner:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append({"path": request.path, "host": request.host})
            if request.path.startswith("/redirect/"):
                status, location = REDIRECTS[int(request.path.rsplit("/", 1)[1])]
                return web.Response(status=status, headers={"location": location})
            return web.json_response({"id": "ch_lab", "status": "succeeded"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, PUBLIC, PORT, ssl_context=context).start()
        return runner


class Dns(asyncio.DatagramProtocol):
    """A scripted authoritative answer (RFC 1035 packing, A and AAAA only, TTL 0 so nothing
    caches): small enough to write here rather than add a DNS library for the tests."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.a_lookups: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (the selector loop's class is not a subclass).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        ident, flags = struct.unpack("!HH", data[:4])
        labels, position = [], 12
        while data[position]:
            length = data[position]
            labels.append(data[position + 1 : position + 1 + length].decode().lower())
            position += 1 + length
        qtype = struct.unpack("!H", data[position + 1 : position + 3])[0]
        question = data[12 : position + 5]
        name = ".".join(labels)
        steps = ZONE.get(name)
        records: list[bytes] = []
        if steps is not None:
            turn = self.a_lookups[name]
            if qtype == 1:  # A: one lookup (glibc asks A and AAAA together)
                self.a_lookups[name] += 1
            for address in steps[min(turn, len(steps) - 1)]:
                ip = ipaddress.ip_address(address)
                if (qtype, ip.version) in ((1, 4), (28, 6)):
                    records.append(
                        b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 0, len(ip.packed)) + ip.packed
                    )
        rcode = 0 if steps is not None else 3
        header = struct.pack(
            "!HHHHHH", ident, 0x8080 | (flags & 0x0100) | rcode, 1, len(records), 0, 0
        )
        assert self.transport is not None
        self.transport.sendto(header + question + b"".join(records), addr)


# --- the cases -------------------------------------------------------------------------------


Case = dict[str, Any]


async def measured(
    taps: Taps, public: PublicServer, dns: Dns, run: Callable[[], Awaitable[Any]]
) -> Case:
    before_taps, before_public = taps.snapshot(), len(public.requests)
    before_dns = Counter(dns.a_lookups)
    outcome = await run()
    await asyncio.sleep(0.05)  # a connection in flight is accepted by now
    after = taps.snapshot()
    return {
        "outcome": outcome,
        "tap_hits": {a: after[a] - before_taps[a] for a in INTERNAL if after[a] != before_taps[a]},
        "public_requests": public.requests[before_public:],
        "dns_a_lookups": dict(dns.a_lookups - before_dns),
    }


async def webhook_cases(taps: Taps, public: PublicServer, dns: Dns) -> dict[str, Case]:
    from api.services.events import Publisher
    from api.services.webhooks import SecretBox, WebhookDeliverer, destination_problem

    deliverer = WebhookDeliverer(
        pool=None, box=SecretBox(b"k" * 32), publisher=Publisher(), production=True
    )
    cases: dict[str, Case] = {}

    send = partial(_send_with, deliverer)
    try:
        cases["webhook:public"] = await measured(
            taps, public, dns, partial(send, "https://hooks.test:8443/ok")
        )
        cases["webhook:public-ip"] = await measured(
            taps, public, dns, partial(send, f"https://{PUBLIC}:8443/ok")
        )
        for url in BLOCKED_WEBHOOK_URLS:
            case = await measured(taps, public, dns, partial(send, url))
            case["registration_problem"] = await destination_problem(url, production=True)
            cases[f"webhook:blocked:{url}"] = case
        for index, (_, location) in enumerate(REDIRECTS):
            url = f"https://hooks.test:8443/redirect/{index}"
            cases[f"webhook:redirect:{location}"] = await measured(
                taps, public, dns, partial(send, url)
            )
        for name in ("rebind.hooks.test", "rebind-metadata.hooks.test"):
            url = f"https://{name}:8443/ok"
            cases[f"webhook:rebind:{name}"] = await measured(taps, public, dns, partial(send, url))
    finally:
        await deliverer.close()
    # The control: development rules allow https anywhere, so the same sender does connect to
    # the metadata listener; the zeros above are the policy's, not a deaf listener's.
    developer = WebhookDeliverer(
        pool=None, box=SecretBox(b"k" * 32), publisher=Publisher(), production=False
    )
    try:
        cases["webhook:development-control"] = await measured(
            taps,
            public,
            dns,
            partial(_send_with, developer, "https://169.254.169.254:8443/latest/meta-data/"),
        )
    finally:
        await developer.close()
    return cases


async def _send_with(deliverer: Any, url: str) -> list[Any]:
    status, error = await deliverer._send(url, b"{}", ["whsec_lab"], "evt_lab")
    return [status, error]


#: Vault forward destinations as an operator might allowlist them; in production each must
#: reach a public address only.
BLOCKED_DESTINATIONS = {
    "metadata_name": "https://psp-metadata.hooks.test:8443",
    "metadata_ip": "https://169.254.169.254:8443",
    "loopback": "https://127.0.0.1:8443",
    "localhost": "https://localhost:8443",
    "ipv6_loopback": "https://[::1]:8443",
    "private": "https://10.0.0.7:8443",
    "private_name": "https://internal.hooks.test:8443",
    "cgnat": "https://100.64.0.1:8443",
    "unique_local": "https://[fd00::7]:8443",
    "mapped": "https://[::ffff:127.0.0.1]:8443",
    "mapped_name": "https://mapped.hooks.test:8443",
    "sixtofour": "https://[2002:7f00:1::1]:8443",
    "nat64": "https://[64:ff9b::7f00:1]:8443",
    "decimal": "https://2130706433:8443",
    "octal": "https://0177.0.0.1:8443",
    "mixed": "https://mixed.hooks.test:8443",
}
PATHS = ("/charge", *(f"/redirect/{n}" for n in range(len(REDIRECTS))))
#: What a caller controls in a forward request, aimed at an internal host; all refused.
HOSTILE_TEMPLATES: dict[str, dict[str, Any]] = {
    "path_authority": {"path": "//127.0.0.1:8443/charge"},
    "path_userinfo": {"path": "@169.254.169.254:8443/charge"},
    "path_traversal": {"path": "/charge/../../latest/meta-data"},
    "path_query": {"path": "/charge?next=http://10.0.0.7:8443/"},
    "host_header": {"headers": {"Host": "169.254.169.254:8443"}},
    "unknown_destination": {"destination": "metadata"},
}


async def vault_cases(taps: Taps, public: PublicServer, dns: Dns) -> dict[str, Case]:
    from core.errors import TesseraError
    from vault.forward import Destination, Forwarder, ForwardRequest, check_template
    from vault.tokens import Card

    card = Card(TEST_CARD, 12, 2034, "Lab Shopper", "123")
    destinations = {
        "psp": Destination(url="https://psp.hooks.test:8443", paths=PATHS),
        "psp_rebind": Destination(url="https://psp-rebind.hooks.test:8443", paths=PATHS),
        **{name: Destination(url=url, paths=PATHS) for name, url in BLOCKED_DESTINATIONS.items()},
    }

    async def forward(forwarder: Forwarder, template: dict[str, Any]) -> list[Any]:
        fields = {
            "destination": "psp",
            "path": "/charge",
            "token": "tok_lab",
            "body": {"number": "{{card.number}}"},
            **template,
        }
        try:
            request = ForwardRequest(**fields)
            destination = check_template(request, destinations)
            response = await forwarder.send(destination, request, card)
        except TesseraError as exc:
            return ["error", exc.code, exc.extra.get("sent")]
        return ["status", response.status]

    cases: dict[str, Case] = {}
    production = Forwarder(destinations, 3.0, public_only=True)
    try:
        cases["vault:public"] = await measured(taps, public, dns, partial(forward, production, {}))
        for name in BLOCKED_DESTINATIONS:
            cases[f"vault:blocked:{name}"] = await measured(
                taps, public, dns, partial(forward, production, {"destination": name})
            )
        for index, (_, location) in enumerate(REDIRECTS):
            cases[f"vault:redirect:{location}"] = await measured(
                taps, public, dns, partial(forward, production, {"path": f"/redirect/{index}"})
            )
        for name, template in HOSTILE_TEMPLATES.items():
            cases[f"vault:template:{name}"] = await measured(
                taps, public, dns, partial(forward, production, template)
            )
        cases["vault:rebind:first"] = await measured(
            taps, public, dns, partial(forward, production, {"destination": "psp_rebind"})
        )
    finally:
        await production.close()
    # A new process's pool: its lookup gets the changed answer (127.0.0.1) and is refused.
    restarted = Forwarder(destinations, 3.0, public_only=True)
    try:
        cases["vault:rebind:next"] = await measured(
            taps, public, dns, partial(forward, restarted, {"destination": "psp_rebind"})
        )
    finally:
        await restarted.close()
    developer = Forwarder(destinations, 3.0)  # the control: development allows any address
    try:
        cases["vault:development-control"] = await measured(
            taps, public, dns, partial(forward, developer, {"destination": "metadata_ip"})
        )
    finally:
        await developer.close()
    return cases


async def self_check(taps: Taps) -> dict[str, int]:
    """One direct connection to each listener: each must count exactly one."""
    before = taps.snapshot()
    for address in INTERNAL:
        _, writer = await asyncio.open_connection(address, PORT)
        writer.close()
    await asyncio.sleep(0.05)
    after = taps.snapshot()
    return {address: after[address] - before[address] for address in INTERNAL}


async def main(directory: Path, out: Path) -> None:
    loop = asyncio.get_running_loop()
    dns = Dns()
    transport, _ = await loop.create_datagram_endpoint(lambda: dns, local_addr=("127.0.0.1", 53))
    taps = Taps()
    await taps.start()
    public = PublicServer()
    runner = await public.start(server_context(directory))
    try:
        results = {
            **await webhook_cases(taps, public, dns),
            **await vault_cases(taps, public, dns),
            "taps:self-check": {"tap_hits": await self_check(taps)},
        }
    finally:
        await runner.cleanup()
        for server in taps.servers:
            server.close()
        transport.close()
    out.write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
