"""``ee-cp``: the control plane process and its supervision tree.

::

    cp (one_for_one)
    ├── records        record writer: events → SQLite history (not liveness)
    ├── accounts       durable business store (SQLite, or PostgreSQL with --database):
    │                  accounts, hashed API keys, the billing ledger
    ├── billing        metering loop: usage windows charged to the ledger (ee.cp.billing)
    ├── identities     VM-name bindings and drain flags as signed manifests (loads first)
    ├── datacenters    dynamic: DatacenterActor per label
    ├── agents         dynamic: AgentActor per agent (transient)
    ├── apps           dynamic: AppActor per app, repopulated from signed manifests
    ├── capacity       dynamic: CapacityPoolActor per (datacenter, node size), likewise
    ├── agent-plane    trio-websocket listener for agent sessions (--agent-listen)
    ├── checkpoint     writes the signed list of live agents (the readiness quorum)
    └── http           Hypercorn serving the Quart-Trio app (--listen)

Both listeners are children of the tree, so a crash of either is restarted like any
actor, and a stop closes them in reverse order: HTTP first, then the agent plane (which
tells every agent to reconnect shortly), then the actors. SIGTERM/SIGINT trigger that
graceful stop; a second signal cancels at once.

Federation (``--role master|dc``): a ``federation`` subtree joins the tree, see
ee.federation.master (dc links, one FederatedDatacenterActor each) and ee.federation.dc
(outbox and uplink); a dc CP refuses agents of another datacenter (WRONG_DATACENTER).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, cast

import attrs
import trio

from ee.actors.agent import AgentDeps, AgentSettings
from ee.actors.app import (
    AppActor,
    AppDeps,
    DeploySettings,
    GetDeployment,
    ListVersions,
    Reconcile,
)
from ee.actors.directory import AgentDirectory, Nudges
from ee.actors.identity import Binding, Identity
from ee.actors.pool import PoolDeps, PoolDirectory
from ee.attestation import Collateral, Verifier
from ee.attestation.pccs import PccsClient, normalise_fmspc
from ee.attestation.policy import Policy
from ee.attestation.tpm import TpmVerifier
from ee.capacity import PoolKey
from ee.cp import billing as billing_mod
from ee.cp import bootstrap as bootstrap_mod
from ee.cp import tenants
from ee.cp.agent_plane import AgentPlane, PlaneSettings
from ee.cp.billing import Billing, BillingDeps, BillingSettings
from ee.cp.bootstrap import Bootstrap, BootstrapError
from ee.cp.collateral_refresh import CollateralRefresher, GraceJudge, RefreshSettings
from ee.cp.deploy_metrics import run_deploy_metrics
from ee.cp.envelope import CpAttestation, EnvelopeProver, load_cp_release, make_prover
from ee.cp.events import Event, EventBus
from ee.cp.http import make_app, serve_http
from ee.cp.identities import IdentityBook
from ee.cp.manifests import ManifestStore
from ee.cp.metrics import CpMetrics
from ee.cp.nodes import LabelError, Vocabulary
from ee.cp.readiness import Quorum, Readiness, Tally
from ee.cp.records import (
    HistoryRow,
    RecordStore,
    RecordStoreError,
    RejectionTally,
    event_row,
    prune_history_forever,
    registration_row,
)
from ee.cp.registration import Judge, Refusal
from ee.cp.releases import AdmittedRelease, ReleaseRefused, policy_with, recheck
from ee.cp.secrets import (
    PolicyError,
    ReleasePolicy,
    ReleaserDeps,
    SecretReleaser,
    SecretVault,
    load_or_create_wrapping_key,
)
from ee.cp.tunnels import CloudflareSettings, CloudflareTunnels
from ee.federation.dc import (
    DcFederation,
    EnrolError,
    digest,
    enroll,
    install_bundle,
    write_request,
)
from ee.federation.master import FederationSettings, MasterFederation
from ee.federation.reconcile import LocalApps
from ee.federation.rpc import DcSources
from ee.federation.trust import ReleaseHooks, carried_releases
from ee.federation.wire import WRONG_DATACENTER
from ee.protocol.messages import Attestation
from ee.protocol.signing import SignatureError, read_signed, write_signed
from ee.runtime import ActorError, Registry
from ee.supervisors import ChildSpec, Restart, StartFailed, Supervisor, actor_spec

log = logging.getLogger("ee.cp")

CHECKPOINT = "checkpoint.json"
HISTORY_BATCH = 255  # events drained after the first: one history write per ≤256 events


def _drain(channel: trio.MemoryReceiveChannel[Event], most: int) -> list[Event]:
    """Up to *most* events already queued on *channel*, without waiting."""
    out: list[Event] = []
    while len(out) < most:
        try:
            out.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return out


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@attrs.frozen
class CpConfig:
    data_dir: Path
    listen: str = "127.0.0.1:8000"
    agent_listen: str = "127.0.0.1:8001"
    role: str = "standalone"
    upstream: str | None = None
    dev: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    agent_tls_cert: str | None = None
    agent_tls_key: str | None = None
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 30.0
    offline_after_s: float = 90.0
    attest_interval_s: float = 3600.0
    nonce_ttl_s: float = 30.0
    max_frame_bytes: int = 1 << 20
    max_request_bytes: int = 64 << 20
    checkpoint_interval_s: float = 30.0
    quorum: Quorum = Quorum()
    vocabulary: Vocabulary = Vocabulary()
    collateral_file: str | None = None
    # Production trust (bootstrap bundle signer, collateral from PCS/PCCS): see
    # ee.cp.bootstrap and ee.cp.collateral_refresh.
    bundle_pubkey: str | None = None
    pccs_url: str | None = None
    pccs_fmspcs: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    pccs_ca: str = "platform"
    pccs_timeout_s: float = 10.0
    pccs_api_key_env: str | None = None  # name of the env var holding a PCS API key
    collateral_refresh_s: float = 86400.0
    collateral_stale: str = "strict"  # strict: refuse on stale collateral; warn: admit, flag
    collateral_grace_s: float = 7 * 86400.0
    attestation_threads: int = 2
    history_retention_s: float = 30 * 86400.0  # history rows older than this are pruned
    history_prune_interval_s: float = 3600.0
    rejection_flush_interval_s: float = 5.0  # refused registrations: tally, then write
    tenant_max_versions: int = 200  # per account
    tenant_max_stored_bytes: int = 512 << 20  # per account: compose texts + build contexts
    # How the CP proves its write key to agents (ee.cp.envelope): "tsm" (the CP runs in a
    # TD), "sim" (dev, or a test TD), "none" (no proof: agents with cp_envelope=required
    # refuse every write). Default: sim with --dev, else tsm.
    cp_attestation: str | None = None
    tsm_root: str = "/sys/kernel/config/tsm/report"
    # The signed release this CP runs (a release directory: manifest.json + .sig), shown
    # to agents with each proof so those that pin release keys accept this CP's MRTD.
    release: str | None = None
    # Cloudflare tunnels granted at registration (ee.cp.tunnels.CloudflareSettings fields:
    # account_id, zone_id, api_token_file, domain, api_base?, origin_service?, timeout_s?).
    tunnels: dict[str, Any] | None = None
    # Durable business state (accounts, keys, ledger): a postgresql:// URL, or None for
    # DATA_DIR/accounts.sqlite3. Billing settings: ee.cp.billing.BillingSettings fields.
    database: str | None = None
    billing: dict[str, Any] | None = None
    # Federation (ee.federation): role dc needs upstream + datacenter (and a join token
    # the first time); role master listens for dc CPs on federation_listen (mTLS).
    datacenter: str | None = None
    join_token: str | None = None
    federation_listen: str = "127.0.0.1:8002"
    federation_advertise: str | None = None
    degraded_after_s: float = 30.0
    federation_heartbeat_s: float = 2.0
    federation_ask_timeout_s: float = 10.0  # a master's request to a dc (federation.rpc)
    federation_stats_s: float = 15.0  # a dc sends its own metrics this often (if changed)
    # Phase timeouts and log retention: ee.actors.app.DeploySettings fields.
    deployments: dict[str, Any] | None = None

    @classmethod
    def from_sources(cls, args: argparse.Namespace) -> CpConfig:
        doc: dict[str, Any] = {}
        if args.config:
            try:
                doc = json.loads(Path(args.config).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"--config {args.config}: {exc}") from None
            if not isinstance(doc, dict):
                raise ValueError(f"--config {args.config}: expected a JSON object")
        for flag in ("listen", "agent_listen", "data_dir", "role", "upstream", "tls_cert",
                     "tls_key", "agent_tls_cert", "agent_tls_key", "history_retention_s",
                     "bundle_pubkey", "pccs_url", "pccs_fmspcs", "collateral_stale",
                     "release", "database", "datacenter", "join_token",
                     "federation_listen", "federation_advertise", "degraded_after_s",
                     "federation_ask_timeout_s", "federation_stats_s"):
            value = getattr(args, flag, None)
            if value is not None:
                doc[flag] = value
        if "join_token" not in doc and os.environ.get("EE_JOIN_TOKEN"):
            doc["join_token"] = os.environ["EE_JOIN_TOKEN"]  # kept out of `ps`
        if args.dev:
            doc["dev"] = True
        data_dir = Path(doc.pop("data_dir", None) or os.environ.get("EE_DATA_DIR")
                        or "/var/lib/easyenclave/cp")
        quorum = Quorum(**doc.pop("quorum", {}))
        vocabulary = Vocabulary.from_config(doc.pop("vocabulary", None))
        known = {f.name for f in attrs.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        try:
            config = cls(data_dir=data_dir, quorum=quorum, vocabulary=vocabulary, **doc)
        except TypeError as exc:
            raise ValueError(f"config: {exc}") from None
        _host_port(config.listen, "listen")
        _host_port(config.agent_listen, "agent_listen")
        if config.role not in ("standalone", "master", "dc"):
            raise ValueError(f"role must be standalone, master or dc, not {config.role!r}")
        if config.role == "dc" and not (config.upstream and config.datacenter):
            raise ValueError("--role dc needs --upstream MASTER_URL and --datacenter LABEL")
        if config.role == "master":
            _host_port(config.federation_listen, "federation_listen")
        for name in ("degraded_after_s", "federation_heartbeat_s", "federation_ask_timeout_s",
                     "federation_stats_s"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        config.refresh_settings()  # validates the collateral settings
        BillingSettings.from_config(config.billing)  # validates the billing settings
        DeploySettings.from_config(config.deployments)  # validates the phase timeouts
        for fmspc in config.pccs_fmspcs:
            normalise_fmspc(fmspc)
        if config.pccs_url and not config.pccs_fmspcs:
            raise ValueError("pccs_url: name the platforms' FMSPCs to fetch (--pccs-fmspc)")
        return config

    def refresh_settings(self) -> RefreshSettings:
        return RefreshSettings(refresh_interval_s=self.collateral_refresh_s,
                               stale=self.collateral_stale,  # type: ignore[arg-type]
                               grace_s=self.collateral_grace_s, ca=self.pccs_ca)


def _ssl(cert: str | None, key: str | None, what: str) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(f"{what}: give both the certificate and the key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class ControlPlane:
    def __init__(self, config: CpConfig, boot: Bootstrap) -> None:
        self.config = config
        self.bootstrap = boot
        self.registry = Registry()
        # The one picture of every agent (AgentActors publish, everyone reads), and the
        # change feed that nudges exactly the apps a change concerns.
        self.directory = AgentDirectory()
        self.nudges = Nudges(self._nudge_app)
        self.directory.subscribe(self.nudges.changed)
        self._preloaded: dict[str, dict[str, Any]] = {}  # app key -> desired, first start
        self.events = EventBus()
        self.metrics = CpMetrics()
        self.attest_limiter = trio.CapacityLimiter(config.attestation_threads)
        self.verifier = Verifier(boot.roots)
        self.tpm_verifier = TpmVerifier(boot.ek_roots) if boot.ek_roots else None
        self.collateral: Collateral | None = None
        self.collateral_refreshed = 0.0
        self._collateral_lock = threading.Lock()
        self.refresher = self._make_refresher()
        self.records: RecordStore | None = None
        self.accounts: RecordStore | None = None
        self.manifests = ManifestStore(config.data_dir / "manifests", boot.signing_key)
        self.deployment_index: dict[str, str] = {}  # deployment id -> app key
        self.refused_manifests: list[str] = []
        self._create_lock = trio.Lock()
        self.started_at = 0.0
        self.expected_agents = self._read_checkpoint()
        # Agents back since start: counted when their actor has adopted a session (and
        # published it), not when the session opens, so an app woken by readiness sees
        # every agent readiness counted.
        self.tally = Tally(self.expected_agents)
        self.directory.subscribe(self._seen)
        self.identities = IdentityBook(self.manifests, self.events.emit)
        self.drained = self.identities.drained  # operator intent, kept as signed manifests
        self._release_lock = trio.Lock()
        self.releases = self._load_releases()  # admitted signed releases (ee.cp.releases)
        self.http_port: int | None = None
        self._http_stop = trio.Event()
        self._ready_logged = False
        # ee-cp (not an in-process test CP) freezes the collector's view once ready.
        self.freeze_gc_when_ready = False
        self.datacenters = Supervisor("datacenters", max_restarts=100, period=10.0)
        self.agents = Supervisor("agents", max_restarts=1000, period=10.0)
        self.apps = Supervisor("apps", max_restarts=100, period=10.0,
                               populate=self._populate_apps)
        self.capacity = Supervisor("capacity", max_restarts=100, period=10.0,
                                   populate=self._populate_pools)
        self.pools = PoolDirectory(self.registry, self.capacity, PoolDeps(
            load=self._load_pool, save=self._save_manifest, agent_views=self.describe_agents,
            emit=self.events.emit, ready=self.is_ready,
            observe_claim_to_registered=self.metrics.claim_to_registered.observe,
            agent_views_for=self._pool_views))
        s = config
        self.agent_settings = AgentSettings(
            heartbeat_interval_s=s.heartbeat_interval_s, stale_after_s=s.stale_after_s,
            offline_after_s=s.offline_after_s, attest_interval_s=s.attest_interval_s)
        host, port = _host_port(config.agent_listen, "agent_listen")
        self.plane = AgentPlane(
            host=host, port=port,
            ssl_context=_ssl(config.agent_tls_cert, config.agent_tls_key, "agent TLS"),
            registry=self.registry, agents=self.agents, datacenters=self.datacenters,
            judge=self.judge, agent_deps=self.agent_deps, events=self.events,
            claim_name=lambda identity, now: self.identities.claim(identity, now),
            prepare_name=lambda name: self.identities.prepare(name),
            directory=self.directory,
            settings=PlaneSettings(max_frame_bytes=s.max_frame_bytes, nonce_ttl_s=s.nonce_ttl_s,
                                   heartbeat_interval_s=s.heartbeat_interval_s,
                                   stale_after_s=s.stale_after_s,
                                   attest_interval_s=s.attest_interval_s),
            record_registration=self._record_registration, metrics=self.metrics,
            attest_limiter=self.attest_limiter, prover=self._make_prover(),
            tunnels=(CloudflareTunnels(CloudflareSettings(**config.tunnels))
                     if config.tunnels else None))
        self.secret_vault = SecretVault(lambda: self.accounts,
                                        load_or_create_wrapping_key(config.data_dir))
        self.secret_releaser = SecretReleaser(ReleaserDeps(
            vault=self.secret_vault, emit=self.events.emit, link_for=self.plane.link_for,
            agent_views=lambda ids: self.directory.views(trio.current_time(), ids),
            deployments=self._app_deployments, policy=self.secret_policy))
        billing = BillingSettings.from_config(config.billing)
        self.billing = Billing(billing, BillingDeps(
            store=lambda: self.accounts,
            sightings=lambda: billing_mod.cp_sightings(
                self.registry, self.deployment_index, None,
                lambda: billing_mod.pool_orders(self.registry, self.pools.keys()),
                billing.datacenter_owners,
                agent_ids=lambda: [r.agent_id for r in self.directory.records()],
                views_of=lambda ids: self.directory.views(trio.current_time(), ids)),
            stop_account=lambda account: billing_mod.stop_account_deployments(
                self.registry, self.deployment_index, account),
            emit=self.events.emit, sizes=config.vocabulary.sizes,
            cp_name=f"{boot.cluster_id}/{os.getpid()}"))
        self.federation = self._make_federation()
        if isinstance(self.federation, DcFederation):  # carried releases: admitted here
            self.federation.release_hooks = ReleaseHooks(
                self.bootstrap.release_keys, tuple(config.vocabulary.sizes),
                lambda: self.releases, self.admit_release, self.withdraw_release)
        if self.federation is not None:
            self.plane.claim_name = self._federated_claim(self.plane.claim_name)
        self.app = make_app(self)
        self.root = Supervisor("cp", [
            ChildSpec(id="records", start=self._run_records, shutdown=5.0),
            ChildSpec(id="accounts", start=self._run_accounts, shutdown=5.0),
            ChildSpec(id="billing", start=self.billing.run, shutdown=5.0),
            *([ChildSpec(id="collateral", start=self.refresher.run, shutdown=1.0)]
              if self.refresher is not None else []),
            # Before the agent plane: bindings and drains are loaded before any agent
            # registers, and flushed after every agent actor has stopped.
            ChildSpec(id="identities", start=self.identities.run,
                      stop=self.identities.request_stop, shutdown=5.0),
            self.datacenters.as_child(),
            self.agents.as_child(),
            self.apps.as_child(),
            self.capacity.as_child(),
            *([self.federation.supervisor.as_child()] if self.federation is not None else []),
            ChildSpec(id="agent-plane", start=self.plane.run, stop=self._stop_plane,
                      shutdown=10.0),
            # After the plane, so it stops (and writes its last checkpoint) before the
            # plane closes the sessions.
            ChildSpec(id="checkpoint", start=self._run_checkpoint, shutdown=1.0),
            ChildSpec(id="secrets", shutdown=1.0, start=partial(
                self.secret_releaser.run, self.events.subscribe)),
            ChildSpec(id="deploy-metrics", shutdown=1.0, start=partial(
                run_deploy_metrics, self.events.subscribe, self.metrics)),
            ChildSpec(id="http", start=self._run_http, stop=self._stop_http,
                      shutdown=10.0),
        ], max_restarts=5, period=30.0)

    # ---- federation ------------------------------------------------------------------

    def _make_federation(self) -> MasterFederation | DcFederation | None:
        c = self.config
        settings = FederationSettings(listen=c.federation_listen,
                                      advertise=c.federation_advertise,
                                      degraded_after_s=c.degraded_after_s,
                                      heartbeat_s=c.federation_heartbeat_s,
                                      ask_timeout_s=c.federation_ask_timeout_s,
                                      stats_interval_s=c.federation_stats_s)
        if c.role == "master":
            return MasterFederation(c.data_dir, self.bootstrap.cluster_id, settings,
                                    registry=self.registry, emit=self.events.emit,
                                    metrics=self.metrics.registry,
                                    normalise=c.vocabulary.normalise_label)
        if c.role == "dc":
            assert c.datacenter is not None
            return DcFederation(c.data_dir, c.vocabulary.normalise_label(c.datacenter),
                                settings, directory=self.directory, emit=self.events.emit,
                                metrics=self.metrics.registry,
                                local=LocalApps(self.create_app, self.registry,
                                                self.deployment_index, self.directory),
                                sources=DcSources(self.registry, self.directory,
                                                  tenants.fetch_logs,
                                                  tenants.replica_attestation))
        return None

    def _federated_claim(self, claim: Callable[[Identity, float], Refusal | None]
                         ) -> Callable[[Identity, float], Refusal | None]:
        """Admission at a dc CP: its own datacenter's agents only; at a master: no direct
        agent of a datacenter that a dc CP serves."""
        fed = self.federation

        def judged(identity: Identity, now: float) -> Refusal | None:
            if isinstance(fed, MasterFederation):
                if fed.is_federated(identity.datacenter):
                    return Refusal(WRONG_DATACENTER, (
                        f"datacenter {identity.datacenter} is served by its dc CP; "
                        "connect there",))
            elif fed is not None and identity.datacenter != fed.label:
                return Refusal(WRONG_DATACENTER, (
                    f"this CP serves datacenter {fed.label}, not {identity.datacenter}",))
            return claim(identity, now)

        return judged

    # ---- trust -----------------------------------------------------------------------

    def _make_refresher(self) -> CollateralRefresher | None:
        c = self.config
        if not c.pccs_url:
            return None
        api_key = os.environ.get(c.pccs_api_key_env) if c.pccs_api_key_env else None
        return CollateralRefresher(
            PccsClient(c.pccs_url, timeout_s=c.pccs_timeout_s, api_key=api_key),
            [normalise_fmspc(f) for f in c.pccs_fmspcs], self.bootstrap.roots,
            c.refresh_settings(), registry=self.metrics.registry, emit=self.events.emit,
            directory=c.data_dir / "collateral")

    def _make_prover(self) -> EnvelopeProver | None:
        kind = self.config.cp_attestation or ("sim" if self.bootstrap.dev else "tsm")
        if kind not in ("tsm", "sim", "none"):
            raise ValueError(f"cp_attestation must be tsm, sim or none, not {kind!r}")
        if kind == "tsm" and not Path(self.config.tsm_root).exists():
            log.warning("cp_attestation tsm: %s does not exist, so this CP cannot prove its "
                        "writes and agents with cp_envelope=required will refuse them "
                        "(run the CP in a TD, or set cp_attestation)", self.config.tsm_root)
        release = None
        if self.config.release:
            release = load_cp_release(self.config.release, self.bootstrap.release_keys)
            log.info("showing agents release %s (signed by %s; image MRTD %s)",
                     self.config.release, release.key_name, release.mrtd)
        return make_prover(cast(CpAttestation, kind), sim_dir=self.bootstrap.sim_dir,
                           tsm_root=self.config.tsm_root, release=release)

    def judge(self) -> Judge:
        now = time.time()
        if self.refresher is not None:
            collateral, grace_at = self.refresher.choose(now)
            if grace_at is not None:
                return GraceJudge(cluster_id=self.bootstrap.cluster_id,
                                  vocabulary=self.config.vocabulary, verifier=self.verifier,
                                  policy=self.policy, collateral=collateral,
                                  bindings=self.identities.bindings, grace_at=grace_at,
                                  tpm=self.tpm_verifier,
                                  routable_urls_only=not self.bootstrap.dev)
            self.collateral = collateral
        else:
            # Re-attestation asks for the judge from worker threads (_CurrentJudge): the
            # lazily made collateral is shared state.
            with self._collateral_lock:
                if self.bootstrap.dev and now - self.collateral_refreshed > 86400:
                    from ee.attestation.providers.sim import SimTD

                    assert self.bootstrap.sim_dir is not None
                    td = SimTD.load(self.bootstrap.sim_dir)
                    self.collateral = td.collateral(issued_at=now - 3600)
                    self.collateral_refreshed = now
                elif self.collateral is None and self.config.collateral_file:
                    self.collateral = Collateral.from_json(
                        Path(self.config.collateral_file).read_text())
        return Judge(cluster_id=self.bootstrap.cluster_id, vocabulary=self.config.vocabulary,
                     verifier=self.verifier, policy=self.policy,
                     collateral=self.collateral, bindings=self.identities.bindings,
                     tpm=self.tpm_verifier, routable_urls_only=not self.bootstrap.dev)

    @property
    def policy(self) -> Policy:
        """The bundle's policy with the admitted releases' measurements added."""
        return self._policy

    def _load_releases(self) -> dict[str, AdmittedRelease]:
        """The kept releases that still verify under the keys the bundle pins now."""
        docs, refused = self.manifests.load("releases")
        self.refused_releases = [f"{r.path}: {r.reason}" for r in refused]
        kept: dict[str, AdmittedRelease] = {}
        for doc in docs:
            try:
                release = recheck(doc, self.bootstrap.release_keys)
            except ReleaseRefused as exc:
                self.refused_releases.append(
                    f"release {doc.get('name')} {doc.get('version')} for node size "
                    f"{doc.get('node_size')}: dropped ({exc.code}: {exc.reason})")
                continue
            kept[release.ident] = release
        for message in self.refused_releases:
            log.error("kept release refused: %s", message)
        self._policy = policy_with(self.bootstrap.policy, kept.values())
        return kept

    async def admit_release(self, release: AdmittedRelease) -> bool:
        """Keep *release* and extend the policy with it; False when already admitted."""
        async with self._release_lock:
            if release.ident in self.releases:
                return False
            await trio.to_thread.run_sync(self.manifests.write, "releases", release.ident,
                                          release.to_manifest())
            self.releases[release.ident] = release
            self._policy = policy_with(self.bootstrap.policy, self.releases.values())
        self.events.emit("release.admitted", release.node_size,
                         {"id": release.ident, "name": release.name,
                          "version": release.version, "commit": release.commit,
                          "key": release.key_name,
                          "manifest_sha256": release.manifest_sha256,
                          "measurements": release.measurements.to_json()})
        log.info("release %s %s (%s) admitted for node size %s", release.name,
                 release.version, release.commit[:12], release.node_size)
        await self._carry_releases()
        return True

    async def withdraw_release(self, ident: str) -> AdmittedRelease | None:
        """Forget an admitted release and take its measurements out of the policy."""
        async with self._release_lock:
            release = self.releases.get(ident)
            if release is None:
                return None
            await trio.to_thread.run_sync(self.manifests.delete, "releases", ident)
            del self.releases[ident]
            self._policy = policy_with(self.bootstrap.policy, self.releases.values())
        self.events.emit("release.withdrawn", release.node_size,
                         {"id": ident, "name": release.name, "version": release.version})
        await self._carry_releases()
        return release

    async def _carry_releases(self) -> None:
        """A master carries its admitted releases to its dcs (ee.federation.trust)."""
        if isinstance(self.federation, MasterFederation):
            async with self._release_lock:  # the set as it is now, one publish at a time
                await self.federation.set_releases(carried_releases(self.releases.values()))

    def agent_deps(self) -> AgentDeps:
        return AgentDeps(settings=self.agent_settings, link_for=self.plane.link_for,
                         reattester=_CurrentJudge(self.judge), emit=self._agent_event,
                         attest_limiter=self.attest_limiter, drained=self.drained,
                         observe_heartbeat=self.metrics.heartbeat_handling.observe,
                         observe_heartbeat_gap=self.metrics.heartbeat_gap.observe,
                         count_fault=lambda stage: self.metrics.plane_faults.labels(stage).inc(),
                         directory=self.directory)

    def _agent_event(self, kind: str, subject: str, data: Any = None) -> None:
        self.events.emit(kind, subject, data)
        if kind == "agent.drain":
            self.identities.drain_changed(subject)

    async def release_name(self, vm_name: str) -> Binding | None:
        """Free *vm_name* for a new key (operator action): forget its durable binding and
        what this process remembers of it. None when the name was not bound."""
        released = await self.identities.release(vm_name)
        if released is not None:
            self.plane.known.pop(vm_name, None)
        return released

    # ---- readiness -------------------------------------------------------------------

    def readiness(self) -> Readiness:
        state = self.tally.assess(self.config.quorum, trio.current_time() - self.started_at)
        if state.ready and not self._ready_logged:
            self._ready_logged = True
            log.info("ready: %s", state.reason)
            self.events.emit("cp.ready", "cp", state.to_dict())
            # Apps waiting for absent agents may now re-place their replicas.
            self.nudges.nudge_all()
            if self.freeze_gc_when_ready:
                # The rebuilt picture is long-lived: out of the collector's sight, so
                # later full collections do not walk every agent's objects (pauses).
                gc.freeze()
        return state

    def _seen(self, _old: Any, new: Any) -> None:
        if new is not None and new.identity is not None:
            self.tally.see(new.agent_id)

    def is_ready(self) -> bool:
        """Has the quorum been met (once met, it stays met: no recount per question)?"""
        return self._ready_logged or self.readiness().ready

    def _read_checkpoint(self) -> set[str]:
        path = self.config.data_dir / CHECKPOINT
        if not path.exists():
            return set()
        try:
            doc = read_signed(path, self.bootstrap.signing_key.public_key())
            return {str(a) for a in doc.get("agents", [])}
        except SignatureError as exc:
            log.warning("ignoring the checkpoint: %s", exc)
            return set()

    async def _write_checkpoint(self) -> None:
        """Sign and write the live agent list in a worker thread (10k ids: canonical
        JSON, a signature and an fsync are no work for the event loop)."""
        agents = list(self.plane.sessions)  # the copy is on the loop; the sort is not
        cluster_id, key = self.bootstrap.cluster_id, self.bootstrap.signing_key
        path = self.config.data_dir / CHECKPOINT

        def write() -> None:
            write_signed(path, {"agents": sorted(agents), "written_at": time.time(),
                                "cluster_id": cluster_id}, key)

        await trio.to_thread.run_sync(write)

    async def _run_checkpoint(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(self.config.checkpoint_interval_s)
                if self.readiness().ready:
                    await self._write_checkpoint()
        finally:
            if self.readiness().ready:
                with trio.CancelScope(shield=True):  # the last one, while stopping
                    await self._write_checkpoint()

    # ---- records ---------------------------------------------------------------------

    async def _run_records(self, task_status: trio.TaskStatus[None]) -> None:
        path = self.config.data_dir / "records.sqlite3"
        try:
            self.records = await RecordStore.open(path)
        except RecordStoreError as exc:
            # History is not liveness: run without it, loudly.
            log.error("record store unavailable, running without history: %s", exc)
            task_status.started()
            await trio.sleep_forever()
        store = self.records
        assert store is not None
        task_status.started()
        tally = RejectionTally()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_rejections, store, tally)
                nursery.start_soon(prune_history_forever, store,
                                   self.config.history_retention_s,
                                   self.config.history_prune_interval_s)
                history = self.events.history_rx
                async for event in history:
                    await self._record(store, tally, [event, *_drain(history, HISTORY_BATCH)])
                nursery.cancel_scope.cancel()
        finally:
            self.records = None
            with trio.CancelScope(shield=True):
                try:
                    await store.add_rejections(tally.take())
                except RecordStoreError as exc:
                    log.warning("history: dropped refused-registration counts: %s", exc)
                await store.close()

    @staticmethod
    async def _record(store: RecordStore, tally: RejectionTally, events: list[Event]) -> None:
        """A batch of events into history, in order, in one thread hop (one transaction);
        if the batch fails, row by row, so a bad row drops only its own event. A refused
        registration is counted, not stored as a row (a peer reconnecting with bad
        registrations must not grow the store); its ``registration.rejected`` event is
        the same fact, live only."""
        rows: list[tuple[Event, HistoryRow]] = []
        for event in events:
            try:
                if event.kind == "registration.rejected":
                    continue
                if event.kind == "registration" and event.data.get("outcome") == "rejected":
                    reasons = [str(r) for r in event.data.get("reasons") or ["UNKNOWN"]]
                    tally.add(reasons[0], event.at, str(event.data.get("vm_name") or "-"),
                              "; ".join(reasons[1:]))
                elif event.kind == "registration":
                    rows.append((event, registration_row(**event.data)))
                else:
                    rows.append((event, event_row(event.kind, event.subject,
                                                  dict(event.data))))
            except (ValueError, TypeError) as exc:
                log.warning("history: dropped %s event: %s", event.kind, exc)
        try:
            await store.append_history([row for _, row in rows])
            return
        except RecordStoreError as exc:
            if len(rows) == 1:
                log.warning("history: dropped %s event: %s", rows[0][0].kind, exc)
                return
        for event, row in rows:
            try:
                await store.append_history([row])
            except RecordStoreError as exc:
                log.warning("history: dropped %s event: %s", event.kind, exc)

    async def _flush_rejections(self, store: RecordStore, tally: RejectionTally) -> None:
        while True:
            await trio.sleep(self.config.rejection_flush_interval_s)
            try:
                await store.add_rejections(tally.take())
            except RecordStoreError as exc:
                log.warning("history: dropped refused-registration counts: %s", exc)

    def _record_registration(self, data: dict[str, Any]) -> None:
        self.events.emit("registration", data["vm_name"], data)

    async def _run_accounts(self, task_status: trio.TaskStatus[None]) -> None:
        store = await RecordStore.open(self.config.database
                                       or self.config.data_dir / "accounts.sqlite3")
        self.accounts = store
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.accounts = None
            with trio.CancelScope(shield=True):
                await store.close()

    # ---- desired state: apps -----------------------------------------------------------

    def _load_desired(self) -> dict[str, dict[str, Any]]:
        """Every app's manifests, grouped by app key (runs in a worker thread)."""
        refused: list[str] = []
        apps, bad = self.manifests.load("apps")
        refused += [f"{r.path}: {r.reason}" for r in bad]
        versions, bad = self.manifests.load("versions")
        refused += [f"{r.path}: {r.reason}" for r in bad]
        deployments, bad = self.manifests.load("deployments")
        refused += [f"{r.path}: {r.reason}" for r in bad]
        self.refused_manifests = refused
        out: dict[str, dict[str, Any]] = {
            a["app_key"]: {"app": a, "versions": [], "deployments": []} for a in apps}
        for v in versions:
            if v.get("app") in out:
                out[v["app"]]["versions"].append(v)
        for d in deployments:
            if d.get("app") in out:
                out[d["app"]]["deployments"].append(d)
        return out

    async def _load_app(self, app_key: str) -> dict[str, Any]:
        preloaded = self._preloaded.pop(app_key, None)
        if preloaded is not None:
            return preloaded
        desired = await trio.to_thread.run_sync(self._load_desired)
        if app_key not in desired:
            raise RuntimeError(f"no valid manifest for app {app_key} (see manifest.refused "
                               "events)")
        return desired[app_key]

    async def _save_manifest(self, kind: str, ident: str, spec: dict[str, Any]) -> None:
        if kind == "versions":
            spec = {**spec, "app": ident.split("/", 1)[0]}
        await trio.to_thread.run_sync(self.manifests.write, kind, ident, spec)

    async def _delete_manifest(self, kind: str, ident: str) -> None:
        await trio.to_thread.run_sync(self.manifests.delete, kind, ident)

    def app_deps(self) -> AppDeps:
        return AppDeps(load=self._load_app, save=self._save_manifest,
                       directory=self.directory, emit=self.events.emit,
                       reserve_warm=self._reserve_warm, holds=self._holds,
                       ready=self.is_ready, nudges=self.nudges,
                       settings=DeploySettings.from_config(self.config.deployments),
                       owner_of=self.deployment_index.get,
                       remote=self.federation if isinstance(self.federation,
                                                            MasterFederation) else None,
                       delete=self._delete_manifest)

    def _nudge_app(self, app_key: str) -> bool:
        """One ``Reconcile`` for *app_key* (the directory's change feed); False if it
        could not be queued (the next change or the safety sweep tries again)."""
        try:
            self.registry.ref(f"app/{app_key}").try_tell(Reconcile())
        except ActorError:
            return False
        return True

    async def _holds(self) -> dict[str, str]:
        """Agent id -> what a pool holds it for: the deployment it was reserved for
        (so that deployment's placement may use it) or else the reservation id."""
        if not self.pools.keys():
            return {}
        return await self.pools.holds(by_deployment=True)

    async def _pool_views(self, key: PoolKey) -> list[dict[str, Any]]:
        """The views of one pool's agents, from the directory (O(pool), no asks)."""
        return self.directory.views(trio.current_time(),
                                    self.directory.pool_members(key.datacenter,
                                                                key.node_size))

    async def _reserve_warm(self, deployment_id: str, constraints: Any, count: int) -> None:
        """Reserve up to *count* warm agents of the pool the constraints name (if any)."""
        from ee.actors.pool import Reserve

        if not (constraints.datacenter and constraints.node_size):
            return
        try:
            label = self.config.vocabulary.normalise_label(constraints.datacenter)
        except ValueError:
            return
        key = PoolKey(label, constraints.node_size)
        if key.actor_name not in self.registry:
            return
        ref = self.registry.ref(key.actor_name)
        for _ in range(count):
            try:
                if await ref.ask(Reserve(deployment_id), timeout=10) is None:
                    return
            except ActorError:
                return

    async def _start_app(self, app_key: str) -> None:
        deps = self.app_deps()
        await self.apps.start_child(actor_spec(
            self.registry, f"app/{app_key}", lambda: AppActor(app_key, deps),
            restart=Restart.PERMANENT, mailbox_size=256))

    async def _populate_apps(self, apps: Supervisor) -> None:
        desired = await trio.to_thread.run_sync(self._load_desired)
        for message in [*self.refused_manifests, *self.refused_releases]:
            self.events.emit("manifest.refused", "cp", {"detail": message})
        # Each app's first start takes its part of this one load (O(manifests) once,
        # not once per app); a restart of one app reads the manifests again.
        self._preloaded = dict(desired)
        if isinstance(self.federation, MasterFederation):  # deployments placed in dcs
            self.deployment_index.update(self.federation.placed_apps())
        await self._carry_releases()  # the kept releases that still verify, at start
        for app_key, doc in desired.items():
            for d in doc["deployments"]:
                self.deployment_index[d["deployment_id"]] = app_key
            await self._start_app(app_key)

    async def _load_pool(self, ident: str) -> dict[str, Any] | None:
        docs, _ = await trio.to_thread.run_sync(self.manifests.load, "pools")
        for doc in docs:
            if f"{doc.get('datacenter')}/{doc.get('node_size')}" == ident:
                return doc
        return None

    async def _populate_pools(self, _: Supervisor) -> None:
        docs, refused = await trio.to_thread.run_sync(self.manifests.load, "pools")
        for r in refused:
            self.events.emit("manifest.refused", "cp", {"detail": f"{r.path}: {r.reason}"})
        keys = [PoolKey(str(d["datacenter"]), str(d["node_size"])) for d in docs
                if d.get("datacenter") and d.get("node_size")]
        await self.pools.populate(keys)

    async def create_app(self, app_key: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        """Create an app (manifest, then actor); None when it exists already. Serialised,
        so concurrent creates of one name never interleave their manifest writes."""
        async with self._create_lock:
            if f"app/{app_key}" in self.registry:
                return None
            spec = {**spec, "created_at": time.time()}
            await trio.to_thread.run_sync(self.manifests.write, "apps", app_key, spec)
            await self._start_app(app_key)
        self.events.emit("app.created", app_key, {"name": spec["name"]})
        from ee.actors.app import Describe as DescribeApp

        view: dict[str, Any] = await self.registry.ref(f"app/{app_key}").ask(
            DescribeApp(), timeout=10)
        return view

    def with_urls(self, view: dict[str, Any]) -> dict[str, Any]:
        """Add each replica's URL (its agent's HTTP API, which proxies to the workload)."""
        if view.get("federated") is not None:
            return view  # a dc's agents: the URLs their dc reported (MasterFederation.view)
        for replica in view.get("replicas", []):
            session = self.plane.sessions.get(replica["agent_id"])
            replica["url"] = session.identity.url if session is not None else None
        return view

    def _stop_plane(self) -> None:
        self.nudges.paused = True  # sessions close because we stop: nothing is lost
        self.plane.request_stop()

    # ---- http ------------------------------------------------------------------------

    def _stop_http(self) -> None:
        self._http_stop.set()

    async def _run_http(self, task_status: trio.TaskStatus[list[str]]) -> None:
        self._http_stop = trio.Event()
        await serve_http(self.app, self.config.listen, self._http_stop, self.config.tls_cert,
                         self.config.tls_key, task_status)

    # ---- secrets ---------------------------------------------------------------------

    async def secret_policy(self, app_key: str) -> ReleasePolicy:
        """The app's release policy (default when none is stored; one that no longer
        parses, say a node size since removed, releases nothing)."""
        doc = await self.secret_vault.policy_doc(app_key)
        if doc is None:
            return ReleasePolicy()
        vocab = self.config.vocabulary
        try:
            return ReleasePolicy.from_json(doc, known_sizes=vocab.sizes,
                                           normalise_datacenter=vocab.normalise_label)
        except (PolicyError, LabelError) as exc:
            log.error("secret policy of %s no longer valid (%s): releasing nothing",
                      app_key, exc)
            return ReleasePolicy(verdicts=())

    async def _app_deployments(self, app_key: str
                               ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        name = f"app/{app_key}"
        if name not in self.registry:
            return []
        ref = self.registry.ref(name)
        versions = {v["version"]: v for v in await ref.ask(ListVersions(), timeout=5)}
        out = []
        for dep_id, key in sorted(self.deployment_index.items()):
            if key != app_key:
                continue
            view = await ref.ask(GetDeployment(dep_id), timeout=5)
            if view is not None and view["version"] in versions:
                out.append((view, versions[view["version"]]))
        return out

    # ---- views -----------------------------------------------------------------------

    async def describe_agents(self) -> list[dict[str, Any]]:
        """Every agent's view, by agent id: read from the directory, no asks."""
        return self.directory.views(trio.current_time())

    async def refresh_metrics(self) -> None:
        """Scrape-time gauges, from aggregates only (datacenters, pools, the tree): a
        scrape never asks every AgentActor."""
        for status, n in self.directory.status_counts().items():
            self.metrics.agents.labels(status).set(n)
        self.metrics.history_dropped.set(self.events.dropped_history)
        kinds: dict[str, int] = {}
        for node in self.root.snapshot().walk():
            kind = node.name.split("/", 1)[0] if "/" in node.name else node.kind
            kinds[kind] = kinds.get(kind, 0) + node.restarts
        for kind, n in kinds.items():
            self.metrics.restarts.labels(kind).set(n)
        for pool in await self.pools.describe_all():
            dc, size = pool.get("datacenter", "?"), pool.get("node_size", "?")
            for what in ("warm", "reserved", "shortfall", "deployed"):
                if isinstance(pool.get(what), int):
                    self.metrics.pool_gauge.labels(dc, size, what).set(pool[what])
            for state, n in (pool.get("orders_by_state") or {}).items():
                self.metrics.orders_gauge.labels(dc, size, state).set(n)

    # ---- running ---------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[ControlPlane] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.root.run)
            binds = self.root.started_value("http")
            if isinstance(binds, list) and binds:
                self.http_port = int(str(binds[0]).rsplit(":", 1)[1])
            task_status.started(self)
        self.events.close()

    def request_stop(self) -> None:
        self.root.request_stop()


class _CurrentJudge:
    """Re-attestation through the judge of the moment (collateral refreshes while an
    agent stays connected; a judge captured at registration would go stale)."""

    def __init__(self, judge: Callable[[], Judge]) -> None:
        self._judge = judge

    def reattest_answer(self, answer: Attestation, nonce: bytes, identity: Identity, *,
                        now: float) -> Refusal | None:
        return self._judge().reattest_answer(answer, nonce, identity, now=now)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ee-cp",
        description="Run an EasyEnclave control plane: the tenant/admin HTTP API and the "
                    "agent plane (attested agent websocket sessions).")
    p.add_argument("--config", metavar="FILE", help="JSON config file (flags override it)")
    p.add_argument("--listen", metavar="HOST:PORT", help="HTTP API (default 127.0.0.1:8000)")
    p.add_argument("--agent-listen", metavar="HOST:PORT",
                   help="agent plane websocket listener (default 127.0.0.1:8001)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="bootstrap bundle, keys, records (default $EE_DATA_DIR or "
                        "/var/lib/easyenclave/cp)")
    p.add_argument("--role", choices=("standalone", "master", "dc"),
                   help="standalone (default); master (accepts dc CPs and direct agents); "
                        "dc (this datacenter's agents, linked to --upstream)")
    p.add_argument("--upstream", metavar="URL", help="master CP URL (role dc)")
    p.add_argument("--datacenter", metavar="LABEL",
                   help="the datacenter a dc CP serves (role dc); others are refused")
    p.add_argument("--join-token", metavar="TOKEN",
                   help="single-use token from `eectl federation join-token` (role dc, "
                        "first start): trades for the dc's certificate and the master's key "
                        "(default: $EE_JOIN_TOKEN, which other users cannot read in `ps`)")
    p.add_argument("--upstream-ca", metavar="PEM",
                   help="CA that signs the master's https certificate (role dc, join; "
                        "default: the system's)")
    p.add_argument("--master-pin", metavar="SHA256",
                   help="the master pin the join answer or --enroll-bundle must match "
                        "(role dc; join tokens carry it)")
    p.add_argument("--enroll-request", metavar="OUT",
                   help="offline enrolment (role dc): keep fresh keys in DATA_DIR, write "
                        "their public halves to OUT for `eectl federation issue`, and exit")
    p.add_argument("--enroll-bundle", metavar="BUNDLE",
                   help="offline enrolment (role dc): install a bundle from `eectl "
                        "federation issue`, checked against --master-pin")
    p.add_argument("--federation-listen", metavar="HOST:PORT",
                   help="mTLS listener for dc CPs (role master; default 127.0.0.1:8002)")
    p.add_argument("--federation-advertise", metavar="HOST:PORT",
                   help="the address dc CPs dial (role master; default the listener's)")
    p.add_argument("--degraded-after-s", type=float, metavar="SECONDS",
                   help="a dc CP silent this long is degraded (role master; default 30)")
    p.add_argument("--federation-ask-timeout-s", type=float, metavar="SECONDS",
                   help="how long the master waits for a dc's answer to a request (logs, "
                        "attestation proofs; role master; default 10)")
    p.add_argument("--federation-stats-s", type=float, metavar="SECONDS",
                   help="how often a dc CP sends its own metrics to the master, when they "
                        "changed (role dc; default 15)")
    p.add_argument("--dev", action="store_true",
                   help="create (once) a dev bootstrap bundle trusting the sim attestation "
                        "provider, and an admin token (printed, kept in DATA_DIR/admin.token)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate for --listen")
    p.add_argument("--tls-key", metavar="PEM", help="TLS key for --listen")
    p.add_argument("--agent-tls-cert", metavar="PEM", help="TLS certificate for --agent-listen")
    p.add_argument("--agent-tls-key", metavar="PEM", help="TLS key for --agent-listen")
    p.add_argument("--history-retention-s", type=float, metavar="SECONDS",
                   help="keep history (events, registration outcomes) this long; 0 keeps "
                        "it forever (default 30 days)")
    p.add_argument("--bundle-pubkey", metavar="FILE",
                   help="the offline key's public half (PEM, or 64 hex characters) a "
                        "production bootstrap bundle must be signed with")
    p.add_argument("--pccs-url", metavar="URL",
                   help="Intel PCS or a PCCS to fetch verification collateral from "
                        "(refreshed before it expires)")
    p.add_argument("--pccs-fmspc", dest="pccs_fmspcs", action="append", metavar="HEX",
                   help="an FMSPC (12 hex characters) whose collateral to fetch; repeat")
    p.add_argument("--collateral-stale", choices=("strict", "warn"),
                   help="when collateral is past its next update and cannot be refreshed: "
                        "strict refuses quotes (default), warn admits them with a violation")
    p.add_argument("--release", metavar="DIR",
                   help="the signed release this CP runs (manifest.json + .sig, signed by a "
                        "release key the bundle pins): agents that pin release keys accept "
                        "the CP's MRTD when this release names it")
    p.add_argument("--database", metavar="URL",
                   help="durable business state (accounts, API keys, billing ledger): "
                        "postgresql://USER@HOST/DB (psycopg 3), or a SQLite file path "
                        "(default DATA_DIR/accounts.sqlite3)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


#: Flags that only one role reads: given without that role they would be ignored
#: silently (a "dc" that starts standalone), so they are a usage error.
ROLE_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "dc": ("upstream", "datacenter", "join_token", "upstream_ca", "master_pin",
           "enroll_request", "enroll_bundle", "federation_stats_s"),
    "master": ("federation_listen", "federation_advertise", "degraded_after_s",
               "federation_ask_timeout_s"),
}


def misplaced_flag(args: argparse.Namespace, role: str) -> str | None:
    """The usage error for the first flag on the command line that *role* ignores."""
    for needs, flags in ROLE_FLAGS.items():
        for flag in flags:
            if needs != role and getattr(args, flag, None) is not None:
                return f"--{flag.replace('_', '-')} needs --role {needs}"
    return None


def listeners(config: CpConfig) -> tuple[tuple[str, str, str], ...]:
    """(flag, HOST:PORT, the supervision path of the child that binds it) per listener."""
    found = [("--listen", config.listen, "http"),
             ("--agent-listen", config.agent_listen, "agent-plane")]
    if config.role == "master":
        found.append(("--federation-listen", config.federation_listen, "federation/listener"))
    return tuple(found)


def unbindable(config: CpConfig) -> str | None:
    """Why a listener's address cannot be bound now (checked before the tree starts, so
    a taken port is one line, not a supervisor's start failure), or None."""
    for flag, address, _ in listeners(config):
        host, port = _host_port(address, flag)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as exc:
            return f"{flag} {address}: {exc}"
        for family, kind, proto, _name, sockaddr in infos:
            try:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(sockaddr)
            except OSError as exc:
                return f"{flag} {address}: {_reason(exc)}"
    return None


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def start_failure(exc: BaseException, config: CpConfig) -> str | None:
    """A listener that failed to bind, found in the supervisors' StartFailed chain (and
    Trio's exception groups): "--listen HOST:PORT: address already in use"; else None."""
    path: list[str] = []
    error: OSError | None = None
    todo: list[tuple[BaseException, tuple[str, ...]]] = [(exc, ())]
    while todo and error is None:
        current, names = todo.pop()
        if isinstance(current, StartFailed):
            todo.append((current.cause, (*names, current.child)))
        elif isinstance(current, BaseExceptionGroup):
            todo.extend((e, names) for e in current.exceptions)
        elif isinstance(current, OSError):
            path, error = list(names), current
    if error is None:
        return None
    where = "/".join(path)
    for flag, address, child in listeners(config):
        if where == child or where.startswith(child + "/"):
            return f"{flag} {address}: {_reason(error)}"
    return None


def prepare(config: CpConfig) -> tuple[Bootstrap, str | None]:
    """Load (or, with --dev, create once) the bootstrap bundle; returns it and a new token."""
    token = None
    bundle = config.data_dir / bootstrap_mod.BUNDLE
    if config.dev and not bundle.exists():
        token = bootstrap_mod.create_dev(config.data_dir)
    pubkey = (bootstrap_mod.load_bundle_pubkey(config.bundle_pubkey)
              if config.bundle_pubkey else None)
    boot = bootstrap_mod.load(config.data_dir, dev=config.dev, bundle_pubkey=pubkey)
    return boot, token


async def _serve(cp: ControlPlane, token_line: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_cp(task_status: trio.TaskStatus[ControlPlane]) -> None:
                await cp.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # the tree has stopped: stop watching signals

            await nursery.start(run_cp)
            try:  # a closed stdout must not take the CP down
                port = getattr(cp.federation, "bound_port", None)
                if port is not None:
                    host = _host_port(cp.config.federation_listen, "federation_listen")[0]
                    print(f"ee-cp: federation (mTLS) on {host}:{port}", flush=True)
                print(f"ee-cp: http on {cp.config.listen.rsplit(':', 1)[0]}:{cp.http_port}, "
                      f"agents on ws://{cp.plane.host}:{cp.plane.bound_port}"
                      "/api/v2/agents/connect", flush=True)
                print(token_line, flush=True)
            except OSError as exc:
                log.warning("ee-cp: cannot write the start-up lines to stdout: %s", exc)
            async for signum in signals:
                if not cp.root.running:
                    continue
                log.info("signal %s: stopping gracefully (again to force)",
                         signal.Signals(signum).name)
                cp.request_stop()
                break
            async for _ in signals:
                log.warning("second signal: cancelling")
                nursery.cancel_scope.cancel()


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (one fd per agent session)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tune_gc() -> None:
    """Fewer, cheaper collections: a CP holds tens of thousands of long-lived objects per
    thousand agents, and default thresholds make full collections stall the event loop
    (heartbeat p99). Objects alive at start-up are frozen out of collection (and those
    alive when the rehydration quorum is met: ``ControlPlane.freeze_gc_when_ready``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    tune_gc()
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = CpConfig.from_sources(args)
        misplaced = misplaced_flag(args, config.role)
        if misplaced is not None:
            raise ValueError(misplaced)
        if config.role == "dc" and args.enroll_request:
            assert config.datacenter is not None
            out = write_request(config.data_dir,
                                config.vocabulary.normalise_label(config.datacenter),
                                Path(args.enroll_request))
            print(f"ee-cp: enrolment request written to {out} (sha256 {digest(out)}); "
                  "its private keys stay in DATA_DIR/federation/pending", flush=True)
            return 0
        boot, token = prepare(config)
        if config.role == "dc":
            assert config.upstream is not None and config.datacenter is not None
            label = config.vocabulary.normalise_label(config.datacenter)
            if args.enroll_bundle:
                install_bundle(config.data_dir, config.upstream, label,
                               Path(args.enroll_bundle), args.master_pin)
            enroll(config.data_dir, config.upstream, label, config.join_token,
                   dev=config.dev, pin=args.master_pin,
                   upstream_ca=Path(args.upstream_ca) if args.upstream_ca else None)
        taken = unbindable(config)
        if taken is not None:
            raise ValueError(taken)
        cp = ControlPlane(config, boot)
        cp.freeze_gc_when_ready = True
    except (ValueError, BootstrapError, OSError, ssl.SSLError) as exc:
        print(f"ee-cp: {exc}", file=sys.stderr)
        return 2
    except EnrolError as exc:
        print(f"ee-cp: {exc}", file=sys.stderr)
        return 2
    token_path = config.data_dir / bootstrap_mod.ADMIN_TOKEN
    if token is not None:
        token_line = f"ee-cp: admin token (new, kept in {token_path}): {token}"
    elif boot.dev and token_path.exists():
        token_line = f"ee-cp: admin token: {token_path.read_text().strip()} (from {token_path})"
    else:
        token_line = "ee-cp: admin token: as issued with the bootstrap bundle"
    try:
        trio.run(_serve, cp, token_line)
    except KeyboardInterrupt:
        return 130
    except (StartFailed, BaseExceptionGroup) as exc:
        failure = start_failure(exc, config)
        if failure is None:
            raise
        print(f"ee-cp: {failure}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
