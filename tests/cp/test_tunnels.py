"""CloudflareTunnels against a local stand-in of the Cloudflare API (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cloudflare_standin import CloudflareStandIn

from ee.cp.tunnels import CloudflareSettings, CloudflareTunnels, TunnelError

AGENT = "ag-0123456789abcdef0123"


@pytest.fixture
def cf() -> Iterator[CloudflareStandIn]:
    with CloudflareStandIn().serving() as standin:
        yield standin


def _provider(cf: CloudflareStandIn, tmp_path: Path, token: str | None = None) -> CloudflareTunnels:
    token_file = tmp_path / "cf.token"
    token_file.write_text((token or cf.token) + "\n")
    return CloudflareTunnels(CloudflareSettings(
        account_id=cf.account_id, zone_id=cf.zone_id, api_token_file=str(token_file),
        domain="agents.example.com", api_base=cf.base, origin_service="http://127.0.0.1:8080",
        timeout_s=5))


async def test_grant_creates_tunnel_ingress_dns_and_is_idempotent(
        cf: CloudflareStandIn, tmp_path: Path) -> None:
    tunnels = _provider(cf, tmp_path)
    with trio.fail_after(20):
        grant = await tunnels.grant(AGENT, "vm-7")
    assert grant.hostname == f"{AGENT}.agents.example.com"
    [tunnel] = cf.tunnels.values()
    assert tunnel["name"] == f"ee-{AGENT}" and tunnel["config_src"] == "cloudflare"
    assert grant.token == tunnel["token"]
    ingress = tunnel["config"]["ingress"]
    assert [r.get("hostname") for r in ingress] == [
        f"{AGENT}.agents.example.com", "vm-7.agents.example.com", None]
    assert ingress[-1]["service"] == "http_status:404"
    records = {r["name"]: r for r in cf.dns.values()}
    assert set(records) == {f"{AGENT}.agents.example.com", "vm-7.agents.example.com"}
    assert all(r["type"] == "CNAME" and r["content"] == f"{tunnel['id']}.cfargotunnel.com"
               and r["proxied"] is True for r in records.values())
    # again (a reconnect, a restarted CP): same tunnel, same records, nothing created
    cf.calls.clear()
    with trio.fail_after(20):
        again = await tunnels.grant(AGENT, "vm-7")
    assert again == grant and len(cf.tunnels) == 1 and len(cf.dns) == 2
    assert not [c for c in cf.calls if c[0] == "POST"]
    assert not [c for c in cf.calls if c[0] == "PUT" and "dns_records" in c[1]]


async def test_stale_dns_record_is_updated(cf: CloudflareStandIn, tmp_path: Path) -> None:
    """This agent's own record from an earlier tunnel is repointed."""
    cf.dns["old"] = {"id": "old", "type": "CNAME", "name": "vm-7.agents.example.com",
                     "content": "earlier-tunnel.cfargotunnel.com", "proxied": True,
                     "comment": f"easyenclave tunnel of {AGENT}"}
    with trio.fail_after(20):
        await _provider(cf, tmp_path).grant(AGENT, "vm-7")
    [tunnel] = cf.tunnels.values()
    assert cf.dns["old"]["content"] == f"{tunnel['id']}.cfargotunnel.com"
    assert ("PUT", "/client/v4/zones/zone1/dns_records/old") in cf.calls


@pytest.mark.parametrize("comment", [None, "easyenclave tunnel of ag-ffffffffffffffffffff"])
async def test_records_that_are_not_this_agents_are_never_repointed(
        cf: CloudflareStandIn, tmp_path: Path, comment: str | None) -> None:
    """An agent naming itself like the operator's record (``www``) or another agent's
    alias gets no alias; its canonical name taken so is an error; nothing is written."""
    theirs = {"type": "CNAME", "content": "elsewhere.example.net", "proxied": True,
              **({"comment": comment} if comment else {})}
    cf.dns["www"] = {"id": "www", "name": "www.agents.example.com", **theirs}
    with trio.fail_after(20):
        grant = await _provider(cf, tmp_path).grant(AGENT, "www")
    assert cf.dns["www"]["content"] == "elsewhere.example.net"
    [tunnel] = cf.tunnels.values()
    assert [r.get("hostname") for r in tunnel["config"]["ingress"]] == [grant.hostname, None]
    cf.dns["canon"] = {"id": "canon", "name": "ag-1111111111aaaaaaaaaa.agents.example.com",
                       **theirs}
    with trio.fail_after(20), pytest.raises(TunnelError, match="not this agent's"):
        await _provider(cf, tmp_path).grant("ag-1111111111aaaaaaaaaa", "vm-9")
    assert cf.dns["canon"]["content"] == "elsewhere.example.net"


async def test_an_alias_shaped_like_an_agent_id_is_never_made(
        cf: CloudflareStandIn, tmp_path: Path) -> None:
    """vm_name ``ag-<20 hex>`` would claim another agent's canonical hostname first."""
    with trio.fail_after(20):
        grant = await _provider(cf, tmp_path).grant(AGENT, "ag-2222222222bbbbbbbbbb")
    assert [r["name"] for r in cf.dns.values()] == [grant.hostname]


@pytest.mark.parametrize("vm_name", ["Evil.Name", "a/../b", "x" * 64, "-lead", "vm-7\n", ""])
async def test_vm_names_that_are_not_dns_labels_get_no_alias(
        cf: CloudflareStandIn, tmp_path: Path, vm_name: str) -> None:
    with trio.fail_after(20):
        grant = await _provider(cf, tmp_path).grant(AGENT, vm_name)
    assert [r["name"] for r in cf.dns.values()] == [grant.hostname]


@pytest.mark.parametrize(("step", "named"), [
    ("find_tunnel", "find tunnel"), ("create_tunnel", "create tunnel"),
    ("configure", "configure ingress"), ("token", "get token"),
    ("find_dns", "find DNS record"), ("create_dns", "create DNS record")])
async def test_each_failing_step_is_a_tunnel_error_naming_it(
        cf: CloudflareStandIn, tmp_path: Path, step: str, named: str) -> None:
    cf.fail[step] = 500
    with trio.fail_after(20), pytest.raises(TunnelError, match=rf"{named}.*HTTP 500"):
        await _provider(cf, tmp_path).grant(AGENT, "vm-7")


async def test_garbage_and_auth_failures(cf: CloudflareStandIn, tmp_path: Path) -> None:
    cf.garbage.add("token")
    with trio.fail_after(20), pytest.raises(TunnelError, match="get token: HTTP 200"):
        await _provider(cf, tmp_path).grant(AGENT, "vm-7")
    with trio.fail_after(20), pytest.raises(TunnelError, match=r"HTTP 403.*Authentication"):
        await _provider(cf, tmp_path, token="wrong").grant(AGENT, "vm-7")


async def test_unreachable_api_is_a_tunnel_error(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("x")
    tunnels = CloudflareTunnels(CloudflareSettings(
        account_id="a", zone_id="z", api_token_file=str(token), domain="d.example",
        api_base="http://127.0.0.1:9/client/v4", timeout_s=2))
    with trio.fail_after(20), pytest.raises(TunnelError, match="find tunnel: Connect"):
        await tunnels.grant(AGENT, "vm")


def test_empty_token_file_is_refused_at_start(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        CloudflareTunnels(CloudflareSettings(account_id="a", zone_id="z",
                                             api_token_file=str(token), domain="d"))
