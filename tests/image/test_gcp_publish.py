"""`eectl image publish-gcp` and the GCP launcher against a loopback stand-in of the
OAuth token endpoint, Cloud Storage and Compute Engine (tests/image/gcp_standin.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ee.capacity.gcp import (
    METADATA_KEY,
    GcpLaunchConfig,
    GcpLauncher,
    LaunchRefused,
    count_instances,
    instance_name,
)
from ee.cloud.gcp import (
    GcpApiError,
    GcpAuthError,
    GcpClient,
    GcpConfigError,
    GcpError,
    GcpOperationFailed,
    Retry,
    TokenSource,
    check_endpoint,
    load_service_account,
)
from ee.cloud.publish import GUEST_OS_FEATURES, publish, read_bake_info

from .gcp_standin import QUANTUM, StandIn, gcp_standin, new_service_account

FAST = Retry(attempts=4, base_s=0.01, max_s=0.05)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with gcp_standin() as s:
        yield s


@pytest.fixture
def key_file(standin: StandIn, tmp_path: Path) -> Path:
    doc, key = new_service_account(standin.base)
    standin.trust(doc["client_email"], key)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
async def client(standin: StandIn, key_file: Path) -> AsyncIterator[GcpClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield GcpClient(http, TokenSource(load_service_account(key_file), http),
                        storage_url=standin.base, compute_url=f"{standin.base}/compute/v1",
                        retry=FAST, chunk=QUANTUM)


def fake_bake(tmp: Path, size: int = 5 * QUANTUM + 1234) -> tuple[Path, dict[str, object]]:
    """A file standing in for a baked .tar.gz, with its bake record."""
    tarball = tmp / "ee.tar.gz"
    data = os.urandom(size)
    tarball.write_bytes(data)
    info = {"name": "ee-agent", "family": "ee-agent", "root_hash": "ab" * 32,
            "tar_sha256": hashlib.sha256(data).hexdigest(), "tar_size": size}
    Path(f"{tarball}.json").write_text(json.dumps(info))
    return tarball, info


def stored_md5(standin: StandIn, tarball: Path) -> bool:
    md5 = base64.b64encode(hashlib.md5(tarball.read_bytes()).digest()).decode()
    return any(o["md5Hash"] == md5 for o in standin.objects.values())


# --- auth --------------------------------------------------------------------------


async def test_token_by_jwt_bearer_and_reuse(standin: StandIn, client: GcpClient) -> None:
    with trio.fail_after(20):
        assert await client.get_image("proj", "nothing") is None
        assert await client.get_image("proj", "nothing-either") is None
    assert len(standin.tokens) == 1  # cached, not one token per call
    assert sum(line.startswith("POST /token") for line in standin.log) == 1


async def test_assertion_signed_by_another_key_is_refused(standin: StandIn,
                                                          tmp_path: Path) -> None:
    doc, _ = new_service_account(standin.base)
    _, other = new_service_account(standin.base)
    standin.trust(doc["client_email"], other)  # the stand-in knows a different key
    (tmp_path / "sa.json").write_text(json.dumps(doc))
    async with httpx.AsyncClient(timeout=10) as http:
        tokens = TokenSource(load_service_account(tmp_path / "sa.json"), http)
        with trio.fail_after(20), pytest.raises(GcpAuthError, match="invalid_grant"):
            await tokens.token()


async def test_calls_without_a_valid_token_are_refused(standin: StandIn) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{standin.base}/compute/v1/projects/proj/global/images/x",
                           headers={"Authorization": "Bearer forged"})
    assert r.status_code == 401


def test_key_file_and_endpoint_checks(tmp_path: Path) -> None:
    with pytest.raises(GcpConfigError, match="must be https"):
        check_endpoint("http://storage.example.com")
    assert check_endpoint("http://127.0.0.1:9/") == "http://127.0.0.1:9"
    doc, _ = new_service_account("http://10.1.2.3:80")  # plain http off loopback
    (tmp_path / "sa.json").write_text(json.dumps(doc))
    with pytest.raises(GcpConfigError, match="must be https"):
        load_service_account(tmp_path / "sa.json")
    (tmp_path / "sa.json").write_text(json.dumps({**doc, "type": "authorized_user"}))
    with pytest.raises(GcpConfigError, match="not a service-account key"):
        load_service_account(tmp_path / "sa.json")


# --- upload + image ----------------------------------------------------------------


async def test_publish_creates_the_tdx_image_and_is_idempotent(
        standin: StandIn, client: GcpClient, tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path)
    info = read_bake_info(tarball)
    with trio.fail_after(30):
        first = await publish(client, "proj", "bkt", tarball, info)
        puts = sum(line.startswith("PUT") for line in standin.log)
        second = await publish(client, "proj", "bkt", tarball, info)
    assert first.uploaded and first.created
    assert first.image == f"ee-agent-{info['tar_sha256'][:16]}"
    image = standin.images[("proj", first.image)]
    assert {f["type"] for f in image["guestOsFeatures"]} == set(GUEST_OS_FEATURES)
    assert image["family"] == "ee-agent"
    assert image["rawDisk"]["source"] == f"https://storage.googleapis.com/bkt/{first.object}"
    assert info["tar_sha256"] in image["description"]
    assert stored_md5(standin, tarball)
    assert puts == 6  # 5 full chunks + the tail
    assert not second.uploaded and not second.created
    assert sum(line.startswith("PUT") for line in standin.log) == puts  # nothing re-sent


async def test_publish_reuses_a_stored_object(standin: StandIn, client: GcpClient,
                                              tmp_path: Path) -> None:
    """The object is there (an earlier run died before images.insert): no upload."""
    tarball, _ = fake_bake(tmp_path)
    info = read_bake_info(tarball)
    with trio.fail_after(30):
        await client.upload("bkt", f"easyenclave/ee-agent-{info['tar_sha256'][:16]}.tar.gz",
                            tarball, {"ee-sha256": str(info["tar_sha256"])})
        result = await publish(client, "proj", "bkt", tarball, info)
    assert result.created and not result.uploaded


async def test_upload_resumes_from_the_servers_offset(standin: StandIn, client: GcpClient,
                                                      tmp_path: Path) -> None:
    """Chunk 2 fails with a 503 after the server kept part of it, chunk 3 loses its
    connection: the client asks where the session stands and sends only the rest."""
    tarball, _ = fake_bake(tmp_path, size=8 * QUANTUM + 99)
    standin.upload_faults[:] = ["ok", "503", "ok", "drop"]
    with trio.fail_after(30):
        obj = await client.upload("bkt", "o.tar.gz", tarball, {"ee-sha256": "x"})
    assert obj["size"] == str(tarball.stat().st_size)
    assert stored_md5(standin, tarball)
    status_queries = [line for line in standin.log if line.endswith(f"*/{8 * QUANTUM + 99}")]
    assert len(status_queries) == 2
    # resumed, not restarted: less than twice the file went over the wire
    assert standin.bytes_received < 2 * tarball.stat().st_size


async def test_upload_gives_up_after_bounded_failures(standin: StandIn, client: GcpClient,
                                                      tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path)
    standin.upload_faults[:] = ["503-all"]
    with trio.fail_after(30), pytest.raises(GcpApiError, match="upload failed 4 times"):
        await client.upload("bkt", "o.tar.gz", tarball)
    assert not standin.objects


async def test_a_stored_object_that_differs_is_an_error(standin: StandIn, client: GcpClient,
                                                        tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path)
    standin.corrupt_uploads = True
    with trio.fail_after(30), pytest.raises(GcpApiError, match="differs"):
        await client.upload("bkt", "o.tar.gz", tarball)


async def test_an_upload_session_on_another_host_is_refused(
        standin: StandIn, client: GcpClient, tmp_path: Path) -> None:
    """The bearer token never goes to a session URI off the storage endpoint's origin."""
    tarball, _ = fake_bake(tmp_path)
    standin.session_base = standin.base.replace("127.0.0.1", "localhost")
    with trio.fail_after(30), pytest.raises(GcpApiError, match="another host"):
        await client.upload("bkt", "o.tar.gz", tarball)
    assert not any(line.startswith("PUT") for line in standin.log)


async def test_an_image_of_that_name_with_another_digest_is_not_replaced(
        standin: StandIn, client: GcpClient, tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path)
    info = read_bake_info(tarball)
    name = f"ee-agent-{info['tar_sha256'][:16]}"
    standin.images[("proj", name)] = {"name": name, "description": "sha256:other"}
    with trio.fail_after(30), pytest.raises(GcpError, match="another content digest"):
        await publish(client, "proj", "bkt", tarball, info)
    assert not standin.objects


async def test_image_insert_failure_is_reported(standin: StandIn, client: GcpClient) -> None:
    """images.insert whose rawDisk is missing: the operation's error surfaces."""
    body = {"name": "x", "rawDisk": {"source": "https://storage.googleapis.com/b/missing"},
            "guestOsFeatures": [{"type": t} for t in GUEST_OS_FEATURES]}
    with trio.fail_after(30), pytest.raises(GcpOperationFailed, match="INVALID_IMAGE_FILE"):
        await client.insert_image("proj", body)


def test_a_changed_tarball_is_refused(tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path)
    with tarball.open("r+b") as f:
        f.write(b"X")
    with pytest.raises(GcpConfigError, match="does not match"):
        read_bake_info(tarball)


async def test_publish_cli(standin: StandIn, key_file: Path, tmp_path: Path) -> None:
    tarball, info = fake_bake(tmp_path)
    env = {**os.environ, "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
           "EE_GCP_STORAGE_URL": standin.base,
           "EE_GCP_COMPUTE_URL": f"{standin.base}/compute/v1"}
    argv = [sys.executable, "-m", "ee.ctl.main", "image", "publish-gcp", str(tarball),
            "--project", "proj", "--bucket", "bkt"]

    def run(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=60,
                              check=False)

    first = await trio.to_thread.run_sync(run, env)
    assert first.returncode == 0, first.stderr
    assert f"published: image ee-agent-{str(info['tar_sha256'])[:16]}" in first.stdout
    again = await trio.to_thread.run_sync(run, env)
    assert again.returncode == 0 and "already published" in again.stdout
    no_creds = {k: v for k, v in env.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    missing = await trio.to_thread.run_sync(run, no_creds)
    assert missing.returncode == 2 and "GOOGLE_APPLICATION_CREDENTIALS" in missing.stderr


# --- launcher ----------------------------------------------------------------------


def launch_config(**kw: object) -> GcpLaunchConfig:
    return GcpLaunchConfig(project="proj", zone="us-central1-a",
                           image="projects/proj/global/images/family/ee-agent",
                           cp_url="wss://cp.example/api/v2/agents/connect",
                           datacenter="gcp-a:us-central1", **kw)  # type: ignore[arg-type]


async def test_launcher_launches_lists_counts_and_deletes(standin: StandIn,
                                                          client: GcpClient) -> None:
    launcher = GcpLauncher(client, launch_config())
    with trio.fail_after(30):
        names = [await launcher.launch(f"order-{n}", f"boot-token-{n}", "tiny")
                 for n in range(3)]
        again = await launcher.launch("order-0", "boot-token-0", "tiny")  # a retried launch
        standin.instances[("proj", "us-central1-a", "someone-elses")] = {
            "name": "someone-elses", "labels": {}}
        listed = await launcher.list()
        counts = await count_instances(launcher)
        with pytest.raises(LaunchRefused):
            await launcher.delete("someone-elses")
        await launcher.delete(names[1])
        after = await launcher.list()
    assert again == names[0] and listed == sorted(names)  # 3 pages of 2: paging followed
    assert counts == {"total": 3, "PROVISIONING": 3}
    assert after == sorted([names[0], names[2]])
    assert ("proj", "us-central1-a", "someone-elses") in standin.instances
    body = standin.instances[("proj", "us-central1-a", names[0])]
    assert body["confidentialInstanceConfig"] == {"confidentialInstanceType": "TDX"}
    assert body["machineType"] == "zones/us-central1-a/machineTypes/c3-standard-4"
    assert body["disks"][0]["initializeParams"]["sourceImage"].endswith("family/ee-agent")
    assert body["networkInterfaces"][0]["nicType"] == "GVNIC"
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    config = json.loads(items[METADATA_KEY])
    assert config["bootstrap_token"] == "boot-token-0"
    assert config["vm_name"] == names[0] and config["node_size"] == "tiny"
    assert config["datacenter"] == "gcp-a:us-central1"


async def test_launcher_refusals_and_cloud_failures(standin: StandIn,
                                                    client: GcpClient) -> None:
    launcher = GcpLauncher(client, launch_config())
    with trio.fail_after(30):
        with pytest.raises(LaunchRefused, match="no GCP machine type for node size 'llm'"):
            await launcher.launch("order-9", "t", "llm")
        standin.instance_error = {"code": "QUOTA_EXCEEDED", "message": "C3_CPUS quota"}
        with pytest.raises(GcpOperationFailed, match="QUOTA_EXCEEDED"):
            await launcher.launch("order-10", "t", "tiny")
    assert not standin.instances


def test_instance_names_are_valid_and_stable() -> None:
    assert instance_name("ORD_1") == instance_name("ORD_1")
    assert instance_name("ORD_1") != instance_name("ord-1")
    for order in ("ORD_1", "x" * 200, "--", "Ümlaut/../x"):
        name = instance_name(order)
        assert len(name) <= 63 and name[0].isalpha() and name[-1].isalnum()
    with pytest.raises(LaunchRefused):
        instance_name("")


class _Token:
    async def token(self) -> str:
        await trio.lowlevel.checkpoint()
        return "t"


def _session_server(range_header: str | None) -> tuple[httpx.MockTransport, list[str]]:
    """An upload endpoint whose every chunk PUT answers 308 with *range_header*."""
    puts: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, headers={"Location": "http://127.0.0.1:9/session"})
        puts.append(request.headers.get("Content-Range", ""))
        return httpx.Response(308, headers={"Range": range_header} if range_header else {})
    return httpx.MockTransport(handle), puts


@pytest.mark.parametrize("range_header", [f"bytes=0-{10 * QUANTUM}", "bytes=0-99999999999"])
async def test_a_server_offset_past_the_end_is_refused(tmp_path: Path,
                                                       range_header: str) -> None:
    tarball, _ = fake_bake(tmp_path, size=2 * QUANTUM + 7)
    transport, puts = _session_server(range_header)
    async with httpx.AsyncClient(transport=transport) as http:
        gcp = GcpClient(http, _Token(), storage_url="http://127.0.0.1:9",  # type: ignore[arg-type]
                        retry=FAST, chunk=QUANTUM)
        with trio.fail_after(10), pytest.raises(GcpApiError, match="claims"):
            await gcp.upload("bkt", "o.tar.gz", tarball)
    assert len(puts) == 1


async def test_a_308_that_does_not_advance_is_a_bounded_failure(tmp_path: Path) -> None:
    tarball, _ = fake_bake(tmp_path, size=2 * QUANTUM + 7)
    transport, puts = _session_server(f"bytes=0-{QUANTUM - 1}")  # stuck after chunk 1
    async with httpx.AsyncClient(transport=transport) as http:
        gcp = GcpClient(http, _Token(), storage_url="http://127.0.0.1:9",  # type: ignore[arg-type]
                        retry=FAST, chunk=QUANTUM)
        with trio.fail_after(10), pytest.raises(GcpApiError, match="upload failed 4 times"):
            await gcp.upload("bkt", "o.tar.gz", tarball)
    assert len(puts) < 20
