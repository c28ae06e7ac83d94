"""Control `pan-outside-vault`: no card number anywhere but the vault.

The vault is the only component that may hold a card number (encrypted). This looks for one,
in clear, hex or base64 (`tessera.pci.scan`), everywhere else the running stack keeps data:

- **the API's database**: `pg_dump --data-only` as the auditor role (read-only, a
  repeatable-read snapshot), streamed and scanned as it comes, never written to disk; a finding
  is located by table, dump line and row of that table;
- **every log file** under `log_paths` (files, or directories walked whole; `.gz` files
  decompressed as they are read): file and line;
- **the API's Redis**: every key (SCAN, every node of a cluster) and its value, whatever its
  type (string, hash, list, set, sorted set, stream); the key's name is scanned too;
- **the metrics pages**: the API's `/metrics` and the vault's, from its admin listener (it
  serves `/metrics` on the service and admin listeners, without a credential: the kit does not
  need the service credential for it).

Every distinct number found is then asked about in one call to the vault's fingerprint lookup
(`POST /v1/fingerprints/lookup`, admin credential): whether the vault holds that card (a card
that leaked on its way to or from the vault) or not (one that never came near it). The answer
only adds to the evidence: any finding fails the control either way.

Verdict: **fail** on any finding, even when some source could not be scanned (those are named
in the summary too); **not checked** when nothing was found but at least one source could not be
scanned (which, and why: a clean result from part of the places proves nothing about the
rest); **pass** only when every source was scanned and nothing was found. The evidence has the
bytes, lines or keys scanned per source, and each finding masked (first six, last four).
"""

from __future__ import annotations

import asyncio
import bisect
import gzip
import os
import re
import shutil
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from core.redaction import redact
from tessera.pci.context import EvidenceContext
from tessera.pci.evidence import UNREACHABLE
from tessera.pci.model import Control, ControlResult
from tessera.pci.scan import Finding, LineBlocks, line_of, safe_name, scan, scan_block
from tessera.runtime import redis_client

CONTROL = Control(
    "pan-outside-vault",
    "No card number outside the vault: the API's database, every log, the API's Redis, the "
    "metrics pages",
    ("3.4.1", "3.5.1", "12.5.2"),
)

#: The vault answers at most this many numbers per lookup; more distinct numbers than that are
#: reported without its answer (they fail the control all the same).
LOOKUP_MAX: Final = 100
#: Findings listed one by one in the evidence (all are counted).
LISTED_FINDINGS: Final = 200
_READ_BYTES: Final = 1 << 20
_REDIS_BATCH: Final = 500
_COPY_HEADER: Final = re.compile(rb"^COPY (\S+) \(.*\) FROM stdin;$", re.MULTILINE)


@dataclass
class Source:
    """One place scanned: what was read, what was found, or why it could not be read."""

    name: str
    scanned: bool = True
    reason: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)

    def count(self, what: str, n: int) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def failed(self, reason: str) -> Source:
        self.scanned = False
        self.reason = redact(reason)[:500]
        return self

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.name, "scanned": self.scanned}
        if self.reason:
            entry["reason"] = self.reason
        entry.update(self.counts)
        entry["findings"] = len(self.findings)
        if self.parts:
            entry["parts"] = self.parts
        return entry


# --- (a) the API's database -------------------------------------------------------------------


def _dump_command(url: str) -> tuple[list[str], dict[str, str]]:
    """pg_dump's arguments and environment: the password (if the URL has one) goes in
    PGPASSWORD, not on the command line, where `ps` would show it."""
    parts = urlsplit(url)
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "tessera-pci-evidence"}
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    command = ["pg_dump", "--data-only", "--no-owner", "--no-privileges", "--encoding=UTF8"]
    return [*command, "--dbname", urlunsplit(parts)], env


class _Tables:
    """Which table each line of a dump belongs to: the last `COPY table (…) FROM stdin;`."""

    def __init__(self) -> None:
        self.lines: list[int] = []
        self.names: list[str] = []

    def see(self, first_line: int, block: bytes) -> None:
        for header in _COPY_HEADER.finditer(block):
            self.lines.append(line_of(block, first_line, header.start()))
            self.names.append(safe_name(header[1]))

    def locate(self, line: int) -> str:
        index = bisect.bisect_right(self.lines, line) - 1
        if index < 0:
            return f"dump line {line}"
        return f"{self.names[index]} (dump line {line}, row {line - self.lines[index]})"


async def scan_database(ctx: EvidenceContext) -> Source:
    source = Source("api_database")
    if shutil.which("pg_dump") is None:
        return source.failed("pg_dump is not on the PATH (the PostgreSQL client, version 15+)")
    command, env = _dump_command(ctx.settings.api_database_url)
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    tables = _Tables()
    blocks = LineBlocks()
    try:
        while chunk := await process.stdout.read(_READ_BYTES):
            source.count("bytes", len(chunk))
            for first_line, block in blocks.feed(chunk):
                _scan_dump_block(source, tables, first_line, block)
        for first_line, block in blocks.close():
            _scan_dump_block(source, tables, first_line, block)
        status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await errors).decode("utf-8", "replace").strip()
    if status != 0:
        return source.failed(f"pg_dump exited with {status}: {stderr[-400:]}")
    source.count("lines", blocks.line - 1)
    source.count("tables", len(tables.names))
    return source


def _scan_dump_block(source: Source, tables: _Tables, first_line: int, block: bytes) -> None:
    tables.see(first_line, block)
    for hit in scan_block(block):
        where = tables.locate(line_of(block, first_line, hit.offset))
        source.findings.append(Finding(hit.pan, hit.brand, hit.encoding, where, source.name))


# --- (b) log files ----------------------------------------------------------------------------


def _log_files(ctx: EvidenceContext, paths: Iterable[str]) -> tuple[list[Path], list[str]]:
    files: list[Path] = []
    missing: list[str] = []
    for text in paths:
        path = Path(text) if Path(text).is_absolute() else ctx.root / text
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            missing.append(str(path))
    return files, missing


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb")


def _scan_log_files(source: Source, files: list[Path]) -> None:
    """Synchronous (in a thread): plain file reads and CPU."""
    for path in files:
        name = safe_name(str(path))
        blocks = LineBlocks()
        size = 0

        def scan_blocks(ready: list[tuple[int, bytes]], name: str = name) -> None:
            for first_line, block in ready:
                for hit in scan_block(block):
                    where = f"{name}:{line_of(block, first_line, hit.offset)}"
                    source.findings.append(
                        Finding(hit.pan, hit.brand, hit.encoding, where, source.name)
                    )

        before = len(source.findings)
        try:
            with _open(path) as stream:
                while chunk := stream.read(_READ_BYTES):
                    size += len(chunk)
                    scan_blocks(blocks.feed(chunk))
            scan_blocks(blocks.close())
        except OSError as exc:  # unreadable (permissions, a corrupt .gz): the source is not whole
            source.failed(f"{name}: {type(exc).__name__}: {exc}")
            continue
        lines = blocks.line - 1
        source.count("files", 1)
        source.count("bytes", size)
        source.count("lines", lines)
        source.parts.append(
            {"file": name, "bytes": size, "lines": lines, "findings": len(source.findings) - before}
        )


async def scan_logs(ctx: EvidenceContext) -> Source:
    source = Source("logs")
    if not ctx.settings.log_paths:
        return source.failed("no log path is configured (TESSERA_PCI_LOG_PATHS)")
    files, missing = _log_files(ctx, ctx.settings.log_paths)
    await asyncio.to_thread(_scan_log_files, source, files)
    if missing:
        source.failed(f"no such file or directory: {', '.join(missing)}")
    elif not files:
        source.failed(f"no log file under {', '.join(ctx.settings.log_paths)}")
    return source


# --- (c) the API's Redis ----------------------------------------------------------------------


async def scan_redis(ctx: EvidenceContext) -> Source:
    source = Source("api_redis")
    client = redis_client.connect(
        ctx.settings.api_redis_url, socket_timeout=10, socket_connect_timeout=10
    )
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= _REDIS_BATCH:
                await _scan_keys(client, batch, source)
                batch = []
        if batch:
            await _scan_keys(client, batch, source)
    except redis_client.REDIS_ERRORS as exc:
        return source.failed(f"{type(exc).__name__}: {exc}")
    finally:
        await client.aclose()
    return source


async def _scan_keys(client: Any, keys: list[bytes], source: Source) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        types = await pipe.execute()
    reads = []
    async with client.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, types, strict=True):
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            reads.append((key, kind))
            if kind == "string":
                pipe.get(key)
            elif kind == "hash":
                pipe.hgetall(key)
            elif kind == "list":
                pipe.lrange(key, 0, -1)
            elif kind == "set":
                pipe.smembers(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                pipe.xrange(key, "-", "+")
            else:  # gone since SCAN ("none"), or a module's type: its name is still scanned
                pipe.exists(key)
        values = await pipe.execute()
    for (key, kind), value in zip(reads, values, strict=True):
        name = safe_name(key)
        source.count("keys", 1)
        parts = [key, *_flatten(value)] if kind != "none" else [key]
        for part in parts:
            source.count("bytes", len(part))
            for finding in scan(part, f"{kind} {name}", source.name):
                source.findings.append(finding)
        if kind not in ("string", "hash", "list", "set", "zset", "stream", "none"):
            source.count(f"keys_of_type_{kind}_name_only", 1)


def _flatten(value: Any) -> list[bytes]:
    """Every piece of a Redis value, as bytes (a stream's entries: ids, fields and values)."""
    if value is None:
        return []
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, str):
        return [value.encode()]
    if isinstance(value, int | float):
        return [str(value).encode()]
    if isinstance(value, dict):
        return [piece for k, v in value.items() for piece in (*_flatten(k), *_flatten(v))]
    if isinstance(value, list | tuple | set):
        return [piece for item in value for piece in _flatten(item)]
    return [repr(value).encode()]


# --- (d) the metrics pages --------------------------------------------------------------------


async def scan_metrics(ctx: EvidenceContext, name: str, base_url: str) -> Source:
    source = Source(name)
    url = base_url.rstrip("/") + "/metrics"
    response = await ctx.http.get(url)
    if response.status_code != 200:
        return source.failed(f"GET {url} answered {response.status_code}")
    body = response.content
    source.count("bytes", len(body))
    source.count("lines", body.count(b"\n"))
    for hit in scan_block(body):
        where = f"GET {url} line {line_of(body, 1, hit.offset)}"
        source.findings.append(Finding(hit.pan, hit.brand, hit.encoding, where, source.name))
    return source


async def _guarded(name: str, scan_source: Awaitable[Source]) -> Source:
    """A source that cannot be reached (the runner's `UNREACHABLE`) is not scanned, with the
    reason; the others go on."""
    try:
        return await scan_source
    except UNREACHABLE as exc:
        return Source(name).failed(f"{type(exc).__name__}: {exc}")


# --- the vault's answer -----------------------------------------------------------------------


async def vault_answers(ctx: EvidenceContext, pans: list[str]) -> tuple[dict[str, Any], Any]:
    """{pan: {"stored", "tokens"}} for up to LOOKUP_MAX numbers, and what the call did."""
    asked = pans[:LOOKUP_MAX]
    if not asked:
        return {}, None
    url = ctx.settings.admin_url.rstrip("/") + "/v1/fingerprints/lookup"
    try:
        response = await ctx.http.post(url, json={"numbers": asked}, headers=ctx.admin_headers())
    except Exception as exc:  # the findings stand without the vault's answer
        return {}, {"asked": len(asked), "error": redact(f"{type(exc).__name__}: {exc}")[:300]}
    if response.status_code != 200:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return {}, {"asked": len(asked), "status": response.status_code, "error": code}
    results = response.json()["results"]
    answers = dict(zip(asked, results, strict=True))
    call = {"asked": len(asked), "status": 200, "stored": sum(r["stored"] for r in results)}
    if len(pans) > len(asked):
        call["not_asked"] = len(pans) - len(asked)
    return answers, call


def _held(answer: dict[str, Any] | None) -> str:
    if answer is None:
        return "the vault was not asked"
    if answer["stored"]:
        return f"the vault holds this card ({answer['tokens']} live token(s))"
    return "the vault does not hold this card"


async def run(ctx: EvidenceContext) -> ControlResult:
    sources = [
        await _guarded("api_database", scan_database(ctx)),
        await _guarded("logs", scan_logs(ctx)),
        await _guarded("api_redis", scan_redis(ctx)),
        await _guarded("api_metrics", scan_metrics(ctx, "api_metrics", ctx.settings.api_url)),
        await _guarded("vault_metrics", scan_metrics(ctx, "vault_metrics", ctx.settings.admin_url)),
    ]
    findings = [f for s in sources for f in s.findings]
    distinct = list(dict.fromkeys(f.pan for f in findings))
    answers, lookup = await vault_answers(ctx, distinct)
    numbers = []
    for index, pan in enumerate(distinct, 1):
        mine = [f for f in findings if f.pan == pan]
        numbers.append(
            {
                "number": f"#{index} {mine[0].masked}",
                "brand": str(mine[0].brand),
                "vault": answers.get(pan) or "not asked",
                "occurrences": len(mine),
                "sources": sorted({f.source for f in mine}),
            }
        )
    evidence = {
        "sources": [s.to_dict() for s in sources],
        "findings_total": len(findings),
        "numbers": numbers,
        "findings": [
            {**f.to_dict(), "number": f"#{distinct.index(f.pan) + 1}"}
            for f in findings[:LISTED_FINDINGS]
        ],
        "vault_lookup": lookup,
    }
    unscanned = [s for s in sources if not s.scanned]
    unscanned_text = "; ".join(f"{s.name}: {s.reason}" for s in unscanned)
    if findings:
        first = {pan: next(f for f in findings if f.pan == pan) for pan in distinct}
        lines = [
            f"#{i} {first[pan].masked} ({first[pan].encoding}) in {first[pan].source} "
            f"{first[pan].location}, {len([f for f in findings if f.pan == pan])} occurrence(s); "
            f"{_held(answers.get(pan))}"
            for i, pan in enumerate(distinct, 1)
        ]
        summary = f"{len(distinct)} card number(s) outside the vault: " + "; ".join(lines[:10])
        if unscanned:
            summary += f". Not scanned: {unscanned_text}"
        return CONTROL.failed(summary, evidence)
    if unscanned:
        return CONTROL.not_checked(
            f"no card number in what was scanned, but not every source could be: {unscanned_text}",
            evidence,
        )
    scanned = ", ".join(
        f"{s.name} ({', '.join(f'{v:,} {k}' for k, v in s.counts.items())})" for s in sources
    )
    return CONTROL.passed(f"No card number in clear, hex or base64 in: {scanned}.", evidence)
