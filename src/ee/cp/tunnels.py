"""Tunnels the CP grants agents at registration (``registered.tunnel``).

Theory of operation
-------------------
A :class:`TunnelProvider` turns an admitted agent into a :class:`TunnelGrant`
(``hostname``, ``token``): the agent runs ``cloudflared tunnel run`` with the token
(``ee.agent.tunnel``) and the public reaches its HTTP port at ``https://<hostname>``.

:class:`CloudflareTunnels` does it with the Cloudflare API v4, idempotently, so a
reconnecting agent (or a restarted CP) gets the same tunnel and records again:

1. the tunnel ``ee-<agent_id>``: ``GET /accounts/{account}/cfd_tunnel?name=…&
   is_deleted=false``, created with ``POST /accounts/{account}/cfd_tunnel``
   (``config_src: cloudflare``: its ingress is managed through the API) when absent;
2. DNS: for the canonical hostname ``<agent_id>.<domain>`` and the stable alias
   ``<vm_name>.<domain>`` a proxied CNAME to ``<id>.cfargotunnel.com``, upserted
   (``GET /zones/{zone}/dns_records?type=CNAME&name=…``, then ``PUT`` the record found or
   ``POST`` a new one). Every record we write carries the comment
   ``easyenclave tunnel of <agent_id>``, and an existing record is only ever updated when
   it carries *this* agent's comment: a record of another agent or of the operator
   (``www``, ``cp``, ...) is never repointed;
3. its ingress: ``PUT /accounts/{account}/cfd_tunnel/{id}/configurations`` routing the
   names whose records are this agent's to ``origin_service`` (the agent's HTTP port
   inside the VM), anything else 404;
4. the token: ``GET /accounts/{account}/cfd_tunnel/{id}/token``.

VM names are chosen by agents: the alias is made only when the name is a DNS label
(lowercase letters, digits, inner hyphens, at most 63) that is not shaped like an agent
id (``ag-`` + 20 hex: another agent's canonical name); an alias whose name is taken by a
record that is not this agent's is skipped; a canonical name taken so is a
:class:`TunnelError`. Every API answer is checked (``success``, the shapes used); anything
else is a :class:`TunnelError` naming the step. The CP never lets a failed grant block
a registration: the agent is admitted without a tunnel, an event is emitted, and the
next registration of that agent (every reconnect) tries again.

The API token is read from ``api_token_file`` when the provider is built and sent as
``Authorization: Bearer``; it is never logged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ee.protocol.messages import TunnelGrant

if TYPE_CHECKING:  # httpx is imported where the API is called (start-up time)
    import httpx

__all__ = ["CloudflareSettings", "CloudflareTunnels", "TunnelError", "TunnelProvider"]

CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
TUNNEL_TARGET = "cfargotunnel.com"
_LABEL = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_ERROR_CHARS = 300
OWNER_COMMENT = "easyenclave tunnel of "  # + agent id: marks the DNS records we own
_AGENT_ID_SHAPE = re.compile(r"ag-[0-9a-f]{20}")


class TunnelError(Exception):
    """A tunnel could not be granted; the message names the step and the API's answer."""


class TunnelProvider(Protocol):
    """Grants an agent a tunnel (idempotent per agent id; raises :class:`TunnelError`)."""

    async def grant(self, agent_id: str, vm_name: str) -> TunnelGrant: ...


def dns_label(value: str) -> str | None:
    """*value* as a DNS label, or None when it is not one (no rewriting of peer input)."""
    return value if _LABEL.match(value) else None


@attrs.frozen
class CloudflareSettings:
    """What the CP config names for Cloudflare tunnels."""

    account_id: str
    zone_id: str
    api_token_file: str
    domain: str  # agents get <agent_id>.<domain> and <vm_name>.<domain>
    api_base: str = CLOUDFLARE_API
    origin_service: str = "http://127.0.0.1:8080"
    timeout_s: float = 10.0


class CloudflareTunnels:
    """:class:`TunnelProvider` over the Cloudflare API v4 (see the module docstring)."""

    def __init__(self, settings: CloudflareSettings,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        token = Path(settings.api_token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{settings.api_token_file}: the Cloudflare API token is empty")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._transport = transport

    async def grant(self, agent_id: str, vm_name: str) -> TunnelGrant:
        s = self.settings
        label = dns_label(agent_id)
        if label is None:
            raise TunnelError(f"agent id {agent_id!r} is not a DNS label")
        hostname = f"{label}.{s.domain}"
        alias = dns_label(vm_name)
        owner = OWNER_COMMENT + agent_id
        import httpx

        async with httpx.AsyncClient(base_url=s.api_base, headers=self._headers,
                                     timeout=s.timeout_s, transport=self._transport,
                                     trust_env=False) as http:
            tunnel_id = await self._ensure_tunnel(http, f"ee-{agent_id}")
            target = f"{tunnel_id}.{TUNNEL_TARGET}"
            if not await self._upsert_cname(http, hostname, target, owner):
                raise TunnelError(f"DNS name {hostname} exists and is not this agent's "
                                  "tunnel record")
            names = [hostname]
            if alias is not None and alias != label and not _AGENT_ID_SHAPE.fullmatch(alias):
                name = f"{alias}.{s.domain}"
                if await self._upsert_cname(http, name, target, owner):
                    names.append(name)
            await self._call(http, "configure ingress", "PUT",
                             f"/accounts/{s.account_id}/cfd_tunnel/{tunnel_id}/configurations",
                             json={"config": {"ingress": [
                                 *({"hostname": n, "service": s.origin_service} for n in names),
                                 {"service": "http_status:404"}]}})
            token = await self._call(http, "get token", "GET",
                                     f"/accounts/{s.account_id}/cfd_tunnel/{tunnel_id}/token")
        if not isinstance(token, str) or not token:
            raise TunnelError("get token: the API returned no token")
        return TunnelGrant(hostname=hostname, token=token)

    async def _ensure_tunnel(self, http: httpx.AsyncClient, name: str) -> str:
        path = f"/accounts/{self.settings.account_id}/cfd_tunnel"
        found = await self._call(http, "find tunnel", "GET", path,
                                 params={"name": name, "is_deleted": "false"})
        if not isinstance(found, list):
            raise TunnelError("find tunnel: expected a list")
        for tunnel in found:
            if isinstance(tunnel, dict) and tunnel.get("name") == name and \
                    tunnel.get("deleted_at") is None and isinstance(tunnel.get("id"), str):
                return str(tunnel["id"])
        created = await self._call(http, "create tunnel", "POST", path,
                                   json={"name": name, "config_src": "cloudflare"})
        if not isinstance(created, dict) or not isinstance(created.get("id"), str):
            raise TunnelError("create tunnel: the API returned no tunnel id")
        return str(created["id"])

    async def _upsert_cname(self, http: httpx.AsyncClient, name: str, target: str,
                            owner: str) -> bool:
        """Point *name* at *target*; False (nothing written) when a record of that name
        exists that is not *owner*'s."""
        path = f"/zones/{self.settings.zone_id}/dns_records"
        record = {"type": "CNAME", "name": name, "content": target, "proxied": True, "ttl": 1,
                  "comment": owner}
        found = await self._call(http, f"find DNS record {name}", "GET", path,
                                 params={"name": name})
        if not isinstance(found, list):
            raise TunnelError(f"find DNS record {name}: expected a list")
        for existing in found:
            if isinstance(existing, dict) and existing.get("name") == name:
                if existing.get("comment") != owner or existing.get("type") != "CNAME" \
                        or not isinstance(existing.get("id"), str):
                    return False
                if existing.get("content") != target or existing.get("proxied") is not True:
                    await self._call(http, f"update DNS record {name}", "PUT",
                                     f"{path}/{existing['id']}", json=record)
                return True
        await self._call(http, f"create DNS record {name}", "POST", path, json=record)
        return True

    async def _call(self, http: httpx.AsyncClient, step: str, method: str, path: str,
                    **kwargs: Any) -> Any:
        import httpx

        try:
            response = await http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TunnelError(f"{step}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]) from None
        try:
            doc = response.json()
        except ValueError:
            doc = None
        failed = response.status_code >= 400
        if not isinstance(doc, dict) or failed or doc.get("success") is not True:
            errors = doc.get("errors") if isinstance(doc, dict) else None
            raise TunnelError(f"{step}: HTTP {response.status_code}: {errors!r}"[:MAX_ERROR_CHARS])
        return doc.get("result")
