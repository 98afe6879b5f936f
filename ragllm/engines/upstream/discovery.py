"""Upstream replicas found by name: an entry ``dns+http://vllm-headless:8000`` in
``RAGLLM_UPSTREAM__URLS`` stands for every address the name resolves to (a Kubernetes headless
Service answers with one address per ready pod), each becoming ``http://<address>:8000``. Names are
resolved again on every probe interval, so replicas the autoscaler adds join the pool and those it
removes leave it; plain URLs stay as they are (compose). A name that fails to resolve keeps the
addresses it had: a DNS hiccup does not empty the pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DNS_PREFIX = "dns+"
# host, port → addresses
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class DiscoveredName:
    entry: str
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, entry: str) -> DiscoveredName:
        parts = urlsplit(entry.removeprefix(DNS_PREFIX))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{entry!r}: expected dns+http://name:port or dns+https://name:port")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(entry, parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def url_for(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


async def resolve_addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class ReplicaDiscovery:
    def __init__(self, entries: list[str], resolve: Resolver = resolve_addresses) -> None:
        self.static = [entry for entry in entries if not entry.startswith(DNS_PREFIX)]
        self.names = [
            DiscoveredName.parse(entry) for entry in entries if entry.startswith(DNS_PREFIX)
        ]
        self.resolve = resolve
        self._last: dict[str, list[str]] = {}

    @property
    def dynamic(self) -> bool:
        return bool(self.names)

    async def urls(self) -> list[str]:
        """Every replica URL now: the static ones, then each name's current addresses."""
        found = await asyncio.gather(*(self._urls_of(name) for name in self.names))
        urls = list(self.static)
        for name_urls in found:
            urls += [url for url in name_urls if url not in urls]
        return urls

    async def _urls_of(self, name: DiscoveredName) -> list[str]:
        try:
            addresses = await self.resolve(name.host, name.port)
        except (TimeoutError, OSError) as exc:
            logger.warning(
                "could not resolve %s (%s); keeping its %d known replicas",
                name.host,
                exc,
                len(self._last.get(name.entry, [])),
            )
            return self._last.get(name.entry, [])
        urls = [name.url_for(address) for address in addresses]
        if urls != self._last.get(name.entry):
            logger.info("%s resolves to %d replicas: %s", name.host, len(urls), ", ".join(urls))
        self._last[name.entry] = urls
        return urls
