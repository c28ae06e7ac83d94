"""SSRF: webhook URLs (a merchant chooses them) and vault forward destinations (an operator
allowlists the name; DNS decides the address; the caller picks path, headers and body).

The lab (tests/support/ssrf_lab.py) runs in a network namespace this test makes: every internal
address (loopback, 127.0.0.2, ::1, the 169.254.169.254 metadata address, 10/8, 172.16/12,
192.168/16, CGNAT 100.64/10, unique-local fd00::/8, 6to4 and NAT64 forms of 127.0.0.1) is bound
there with a listener that counts accepted connections; 11.1.1.1 is the "public" HTTPS server;
a scripted DNS server answers every name, including one whose answer changes between lookups.
Nothing can leave the namespace: it has no route out. The services run with production rules
(development allows http to loopback and https anywhere, by design, for local merchants and
simulators: the development-mode controls show that the listeners do hear a connection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.services.webhooks import destination_problem
from tessera.runtime.egress import ambiguous_numeric_host, is_public
from tests.support import ssrf_lab
from tests.support.processes import ROOT

Cases = dict[str, dict[str, Any]]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cases]:
    """Makes the namespace, runs the lab in it once, removes the namespace."""
    namespace = f"tssrf{os.getpid()}"
    etc = Path("/etc/netns") / namespace
    directory = tmp_path_factory.mktemp("ssrf")
    ssrf_lab.make_tls(directory)
    _ip("netns", "add", namespace)
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        for address in ssrf_lab.ADDRESSES:
            if ":" in address:
                if address != "::1":
                    _ip("-n", namespace, "addr", "add", f"{address}/128", "dev", "lo", "nodad")
            elif not address.startswith("127."):
                _ip("-n", namespace, "addr", "add", f"{address}/32", "dev", "lo")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
        out = directory / "cases.json"
        lab_command = [sys.executable, "-m", "tests.support.ssrf_lab", str(directory), str(out)]
        run = subprocess.run(
            ["ip", "netns", "exec", namespace, *lab_command],
            cwd=ROOT,
            env={**os.environ, "SSL_CERT_FILE": str(directory / "ca.pem")},
            capture_output=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr.decode(errors="replace")[-4000:]
        yield json.loads(out.read_text())
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
        for leftover in etc.glob("*"):
            leftover.unlink()
        if etc.exists():
            etc.rmdir()


def _no_leak(case: dict[str, Any]) -> None:
    assert case["tap_hits"] == {}, f"an internal listener accepted a connection: {case}"


# --- the lab hears what it should ------------------------------------------------------------


def test_every_internal_listener_counts_a_connection(lab: Cases) -> None:
    assert lab["taps:self-check"]["tap_hits"] == dict.fromkeys(ssrf_lab.INTERNAL, 1)


def test_development_rules_do_reach_the_metadata_listener(lab: Cases) -> None:
    """The controls: with development rules both services connect to 169.254.169.254, so the
    zeros in production are the policy's."""
    assert lab["webhook:development-control"]["tap_hits"] == {"169.254.169.254": 1}
    assert lab["vault:development-control"]["tap_hits"] == {"169.254.169.254": 1}


# --- webhooks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["https://hooks.test:8443/ok", f"https://{ssrf_lab.PUBLIC}:8443/ok"]
)
def test_a_public_https_endpoint_gets_the_delivery_with_its_own_host_header(
    lab: Cases, url: str
) -> None:
    case = lab["webhook:public" if "hooks.test" in url else "webhook:public-ip"]
    _no_leak(case)
    assert case["outcome"] == [200, ""]
    host = url.split("/")[2]
    assert case["public_requests"] == [{"path": "/ok", "host": host}]


@pytest.mark.parametrize("url", ssrf_lab.BLOCKED_WEBHOOK_URLS)
def test_an_internal_webhook_url_is_refused_and_never_connected(lab: Cases, url: str) -> None:
    case = lab[f"webhook:blocked:{url}"]
    _no_leak(case)
    assert case["public_requests"] == []
    assert case["outcome"] == [None, "blocked_destination"]
    assert case["registration_problem"] is not None  # refused at registration too


@pytest.mark.parametrize(("status", "location"), ssrf_lab.REDIRECTS)
def test_a_redirect_is_a_failed_delivery_and_never_followed(
    lab: Cases, status: int, location: str
) -> None:
    case = lab[f"webhook:redirect:{location}"]
    _no_leak(case)
    assert case["outcome"] == [status, f"http_{status}"]  # not 2xx: retried later as a failure
    assert len(case["public_requests"]) == 1


@pytest.mark.parametrize("name", ["rebind.hooks.test", "rebind-metadata.hooks.test"])
def test_a_dns_answer_that_changes_after_the_check_changes_nothing(lab: Cases, name: str) -> None:
    """The first answer is public, every later one internal: the sender looks up once and
    connects to the address it checked."""
    case = lab[f"webhook:rebind:{name}"]
    _no_leak(case)
    assert case["outcome"] == [200, ""]
    assert case["public_requests"] == [{"path": "/ok", "host": f"{name}:8443"}]
    assert case["dns_a_lookups"] == {name: 1}


# --- the vault's forwarding proxy ------------------------------------------------------------


def test_an_allowlisted_public_destination_gets_the_forward(lab: Cases) -> None:
    case = lab["vault:public"]
    _no_leak(case)
    assert case["outcome"] == ["status", 200]
    assert case["public_requests"] == [{"path": "/charge", "host": "psp.hooks.test:8443"}]


@pytest.mark.parametrize("name", list(ssrf_lab.BLOCKED_DESTINATIONS))
def test_a_destination_at_an_internal_address_receives_nothing(lab: Cases, name: str) -> None:
    case = lab[f"vault:blocked:{name}"]
    _no_leak(case)
    assert case["public_requests"] == []
    assert case["outcome"] == ["error", "destination_unreachable", "false"]


@pytest.mark.parametrize(("status", "location"), ssrf_lab.REDIRECTS)
def test_a_destination_redirect_is_returned_not_followed(
    lab: Cases, status: int, location: str
) -> None:
    case = lab[f"vault:redirect:{location}"]
    _no_leak(case)
    assert case["outcome"] == ["status", status]
    assert len(case["public_requests"]) == 1


@pytest.mark.parametrize("name", list(ssrf_lab.HOSTILE_TEMPLATES))
def test_what_a_caller_controls_cannot_aim_the_vault_elsewhere(lab: Cases, name: str) -> None:
    case = lab[f"vault:template:{name}"]
    _no_leak(case)
    assert case["public_requests"] == []
    assert case["outcome"][0] == "error"
    assert case["outcome"][1] in (
        "path_not_allowed",
        "header_not_allowed",
        "destination_not_allowed",
    )


def test_a_destination_name_rebound_to_loopback_is_refused_at_the_next_lookup(
    lab: Cases,
) -> None:
    first, following = lab["vault:rebind:first"], lab["vault:rebind:next"]
    assert first["outcome"] == ["status", 200]
    assert following["outcome"] == ["error", "destination_unreachable", "false"]
    _no_leak(first)
    _no_leak(following)
    assert following["public_requests"] == []


# --- the policy itself (no network) ----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",  # CGNAT: not `is_private` in Python's table
        "2002:7f00:1::1",  # 6to4 around loopback: `is_global` in Python's table
        "2002:a9fe:a9fe::",  # 6to4 around the metadata address
        "64:ff9b::7f00:1",  # NAT64 around loopback
        "64:ff9b:1::a00:7",  # local-use NAT64
        "::7f00:1",  # IPv4-compatible loopback
        "::ffff:169.254.169.254",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo
        "fec0::1",  # site-local
        "224.0.0.1",
        "255.255.255.255",
        "fe80::1%1",
    ],
)
def test_addresses_that_lead_inside_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize(
    "address", ["11.1.1.1", "93.184.216.34", "2606:4700::1111", "2002:b01:101::1", "::ffff:b01:101"]
)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1", "0x7f000001"])
def test_numeric_hosts_other_than_dotted_decimal_are_ambiguous(host: str) -> None:
    assert ambiguous_numeric_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "hooks.example", "1.example", "::1", "11.1.1.1"])
def test_names_and_dotted_decimal_addresses_are_not(host: str) -> None:
    assert not ambiguous_numeric_host(host)


@pytest.mark.parametrize(
    "url",
    ["http://2130706433:8300/hooks", "http://0177.0.0.1:8300/hooks", "http://127.1:8300/hooks"],
)
async def test_development_refuses_numeric_spellings_too(url: str) -> None:
    """Development allows http to loopback, but not spelled in a form parsers disagree on."""
    assert await destination_problem(url, production=False) is not None
