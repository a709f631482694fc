"""`eectl rollout`: move CP traffic from the old stack to the new one, stage by stage.

    eectl rollout status
    eectl rollout set CLASS PCT        [--drill-pubkey FILE]
    eectl rollout step [CLASS ...]     [--soak SECONDS] [--drill-pubkey FILE]
    eectl rollout back [CLASS ...]
    eectl rollout kill | unkill
    eectl rollout record-drill RESULT --drill-pubkey FILE
    eectl rollout shadow-report        (ee-router only)
    eectl rollout guard --old-metrics URL --new-metrics URL [--interval S] [--events F]

Where the rollout config lives (one of):

* the self-hosted ``ee-router``: ``--router URL`` (``$EE_ROUTER_URL``) with its admin
  token (``--token-file F`` or ``$EE_ROUTER_TOKEN``): ``GET|PUT /_ee/router/config``;
* the Cloudflare Worker: ``--cloudflare`` with ``--cf-account``, ``--cf-namespace`` (the
  Workers KV namespace bound as ``ROLLOUT``), ``--cf-token-file`` (``$CF_API_TOKEN``)
  and ``--cf-api`` (default https://api.cloudflare.com/client/v4): the KV value
  ``config``.

Rules, decided by pure functions here (``plan_*``) before anything is written:
stages are 0 → 2 → 5 → 10 → 25 → 50 → 100; ``step`` moves each named class (default:
every class) to its next stage, refused while the kill switch is on or before the
class has soaked ``--soak`` seconds at its current stage (``changed_at`` in the
config); ``back`` moves to the previous stage, never refused. Any promotion above
25 % (``step`` or ``set``) is refused unless the config carries a DB-wipe drill
result (``record-drill``) that passed, is signed by the pinned ``--drill-pubkey``, and
is younger than ``--drill-max-age``. Exit codes: 0 done, 1 refused, 2 usage/unreachable.

``guard`` is the guardrail loop for a config that lives in the Worker (``ee-router``
runs its own, ``--guard-interval``): every ``--interval`` seconds it reads the config,
scrapes both stacks' ``/metrics`` (``ee.router.guard``), and when a trigger fires
writes the step-back to where the config lives and prints the ``rollout.step_back``
event (one JSON line, also appended to ``--events FILE``). Run one per rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import httpx
import trio

from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    load_public_key,
    read_enveloped,
)
from ee.router.decision import (
    CLASSES,
    STAGES,
    ConfigError,
    RolloutConfig,
    next_stage,
    previous_stage,
)
from ee.router.guard import Guard
from ee.router.guardrails import StepBack
from ee.router.promotion import DEFAULT_DRILL_MAX_AGE_S, drill_ok, promotion_refusal

DEFAULT_SOAK_S = 3600.0


class Refused(Exception):
    """The rollout rules say no (exit 1); the message says why."""


class Unreachable(Exception):
    """The router / Cloudflare API did not give a usable answer (exit 2)."""


# ---- pure planning -----------------------------------------------------------------


def _with_percent(config: RolloutConfig, moves: Mapping[str, float], now: float
                  ) -> RolloutConfig:
    points = dict(config.points)
    changed = dict(config.extra.get("changed_at") or {})
    for klass, pct in moves.items():
        points[klass] = round(pct * 100)
        changed[klass] = now
    return attrs.evolve(config, points=points, extra={**config.extra, "changed_at": changed})


def _gate(config: RolloutConfig, moves: Mapping[str, float], pubkey: Any, now: float,
          max_age_s: float, new_stack: str | None = None) -> None:
    reason = promotion_refusal(config, moves, config.extra.get("drill"), pubkey, now, max_age_s,
                               new_stack=new_stack)
    if reason is not None:
        raise Refused(reason)


def plan_set(config: RolloutConfig, klass: str, pct: float, *, pubkey: Any, now: float,
             max_age_s: float = DEFAULT_DRILL_MAX_AGE_S,
             new_stack: str | None = None) -> RolloutConfig:
    if klass not in CLASSES:
        raise Refused(f"unknown class {klass!r} (classes: {', '.join(CLASSES)})")
    try:
        RolloutConfig.from_json({"classes": {klass: pct}})
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    _gate(config, {klass: pct}, pubkey, now, max_age_s, new_stack)
    return _with_percent(config, {klass: pct}, now)


def plan_step(config: RolloutConfig, classes: Sequence[str], *, soak_s: float, pubkey: Any,
              now: float, max_age_s: float = DEFAULT_DRILL_MAX_AGE_S,
              new_stack: str | None = None) -> RolloutConfig:
    if config.kill_switch:
        raise Refused("the kill switch is on: unkill first")
    changed = config.extra.get("changed_at") or {}
    moves: dict[str, float] = {}
    for klass in classes or CLASSES:
        if klass not in CLASSES:
            raise Refused(f"unknown class {klass!r} (classes: {', '.join(CLASSES)})")
        target = next_stage(config.percent(klass))
        if target is None:
            continue
        since = changed.get(klass)
        if config.percent(klass) > 0 and isinstance(since, int | float) and \
                now - since < soak_s:
            raise Refused(f"class {klass} has soaked {now - since:.0f} s of {soak_s:.0f} s "
                          f"at {config.percent(klass):g} %")
        moves[klass] = float(target)
    if not moves:
        raise Refused("every named class is already at 100 %")
    _gate(config, moves, pubkey, now, max_age_s, new_stack)
    return _with_percent(config, moves, now)


def plan_back(config: RolloutConfig, classes: Sequence[str], *, now: float) -> RolloutConfig:
    moves = {c: float(previous_stage(config.percent(c))) for c in (classes or CLASSES)
             if c in CLASSES and config.percent(c) > 0}
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise Refused(f"unknown class {unknown[0]!r} (classes: {', '.join(CLASSES)})")
    if not moves:
        raise Refused("no named class has traffic on the new stack")
    return _with_percent(config, moves, now)


# ---- where the config lives ---------------------------------------------------------


class Backend(Protocol):
    def get(self) -> RolloutConfig: ...
    def put(self, config: RolloutConfig) -> RolloutConfig: ...


def _answer(resp: httpx.Response, what: str) -> Any:
    try:
        doc = resp.json()
    except ValueError:
        raise Unreachable(f"{what}: {resp.status_code}, not JSON") from None
    if resp.status_code >= 400:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            raise Unreachable(f"{what}: {err.get('message')} ({resp.status_code} "
                              f"{err.get('code')})")
        errors = doc.get("errors") if isinstance(doc, dict) else None
        raise Unreachable(f"{what}: {resp.status_code} {errors or ''}".strip())
    return doc


@attrs.frozen
class RouterBackend:
    url: str
    token: str

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url.rstrip("/"), timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            with self._client() as c:
                resp = c.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach the router at {self.url}: {exc}") from None
        return _answer(resp, f"router {method} {path}")

    def get(self) -> RolloutConfig:
        return RolloutConfig.from_json(self._call("GET", "/_ee/router/config"))

    def put(self, config: RolloutConfig) -> RolloutConfig:
        return RolloutConfig.from_json(self._call("PUT", "/_ee/router/config",
                                                  config.to_json()))

    def get_path(self, path: str) -> Any:
        return self._call("GET", path)


@attrs.frozen
class CloudflareBackend:
    api: str
    account: str
    namespace: str
    token: str

    @property
    def value_url(self) -> str:
        return (f"{self.api.rstrip('/')}/accounts/{self.account}/storage/kv/namespaces/"
                f"{self.namespace}/values/config")

    def _call(self, method: str, content: bytes | None = None) -> httpx.Response:
        try:
            with httpx.Client(timeout=15,
                              headers={"Authorization": f"Bearer {self.token}"}) as c:
                return c.request(method, self.value_url, content=content)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach the Cloudflare API: {exc}") from None

    def get(self) -> RolloutConfig:
        resp = self._call("GET")
        if resp.status_code == 404:
            return RolloutConfig()
        if resp.status_code != 200:
            _answer(resp, "Cloudflare KV read")
            raise Unreachable(f"Cloudflare KV read: {resp.status_code}")
        try:
            return RolloutConfig.from_json(json.loads(resp.content))
        except (ValueError, ConfigError) as exc:
            raise Unreachable(f"the Worker's config in KV does not validate: {exc}") from None

    def put(self, config: RolloutConfig) -> RolloutConfig:
        resp = self._call("PUT", json.dumps(config.to_json(), sort_keys=True).encode())
        _answer(resp, "Cloudflare KV write")
        return config


def backend_from_args(args: argparse.Namespace) -> Backend:
    if args.cloudflare:
        token = _secret(args.cf_token_file, "CF_API_TOKEN", "--cf-token-file")
        if not (args.cf_account and args.cf_namespace):
            raise Unreachable("--cloudflare needs --cf-account and --cf-namespace")
        return CloudflareBackend(args.cf_api, args.cf_account, args.cf_namespace, token)
    url = args.router or os.environ.get("EE_ROUTER_URL")
    if not url:
        raise Unreachable("say where the rollout config is: --router URL or --cloudflare")
    return RouterBackend(url, _secret(args.token_file, "EE_ROUTER_TOKEN", "--token-file"))


def _secret(path: str | None, env: str, flag: str) -> str:
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise Unreachable(f"{flag}: {exc.strerror}: {path}") from None
    value = os.environ.get(env)
    if not value:
        raise Unreachable(f"no token: give {flag} or set ${env}")
    return value


# ---- guard (the Worker's guardrails) -------------------------------------------------


async def guard_pass(backend: Backend, guard: Guard,
                     emit: Callable[[dict[str, Any]], None]) -> StepBack | None:
    """One guardrail pass against the config where it lives; a firing trigger's
    step-back is written there (over the config as it is then: never raising a class
    an operator lowered meanwhile) and *emit*-ted as a ``rollout.step_back`` event."""
    config = await trio.to_thread.run_sync(backend.get)
    fired = await guard.observe(config)
    if fired is None:
        return None
    fresh = await trio.to_thread.run_sync(backend.get)
    stepped = fired.apply(fresh, now=time.time())
    await trio.to_thread.run_sync(backend.put, stepped)
    emit({"kind": "rollout.step_back",
          "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fired.to_dict()})
    return fired


async def guard_loop(backend: Backend, guard: Guard, interval_s: float,
                     emit: Callable[[dict[str, Any]], None], passes: int | None = None) -> None:
    done = 0
    while passes is None or done < passes:
        await trio.sleep(interval_s)
        try:
            await guard_pass(backend, guard, emit)
        except (Unreachable, ConfigError) as exc:  # may be fixed next time; clocks stay
            print(f"eectl rollout guard: {exc}", file=sys.stderr, flush=True)
        done += 1


def _guard(args: argparse.Namespace, backend: Backend) -> int:
    if args.interval <= 0:
        raise Unreachable("--interval: a number of seconds > 0")
    events = Path(args.events) if args.events else None

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True)
        print(line, flush=True)
        if events is not None:
            with events.open("a") as f:
                f.write(line + "\n")

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            guard = Guard({"old": args.old_metrics, "new": args.new_metrics}, client)
            await guard_loop(backend, guard, args.interval, emit, args.passes)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


# ---- commands -----------------------------------------------------------------------


def _pubkey(args: argparse.Namespace) -> Any:
    if not getattr(args, "drill_pubkey", None):
        return None
    try:
        return load_public_key(args.drill_pubkey)
    except KeyFileError as exc:
        raise Unreachable(f"--drill-pubkey: {exc}") from None


def _show(config: RolloutConfig) -> None:
    changed = config.extra.get("changed_at") or {}
    print(f"kill switch  {'ON (everything on old)' if config.kill_switch else 'off'}")
    print("class  new %   next  soaked")
    now = time.time()
    for c in CLASSES:
        pct = config.percent(c)
        nxt = next_stage(pct)
        since = changed.get(c)
        soaked = f"{now - since:.0f} s" if isinstance(since, int | float) else "-"
        print(f"{c:<6} {pct:<7g} {'-' if nxt is None else nxt:<5} {soaked}")
    if config.shadow:
        print("shadow " + ", ".join(f"{c}={r:g}" for c, r in config.shadow.items()))
    drill = config.extra.get("drill")
    if isinstance(drill, dict) and isinstance(drill.get("document"), dict):
        doc = drill["document"]
        print(f"drill  db-wipe passed={doc.get('passed')} finished={doc.get('finished_at')}")
    else:
        print("drill  none recorded (promotion above 25 % is refused)")


def _run(args: argparse.Namespace) -> int:
    backend = backend_from_args(args)
    now = time.time()
    command = args.command
    if command == "status":
        _show(backend.get())
        return 0
    if command == "shadow-report":
        if not isinstance(backend, RouterBackend):
            raise Unreachable("shadow-report reads ee-router; the Worker logs its shadow "
                              "comparisons as {\"ee_shadow\": …} lines (Workers Logs)")
        report = backend.get_path("/_ee/router/shadow")
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"compared {report['compared']}  status diffs {report['status_diffs']}  "
                  f"shape diffs {report['shape_diffs']}  errors {report['errors']}  "
                  f"dropped {report['dropped']}")
            print(f"p99 served {report['served_p99_s']}  p99 shadow {report['shadow_p99_s']}")
            for d in report["recent_diffs"]:
                print(f"  {d['path']}: {d['served_stack']} {d['served_status']} vs "
                      f"{d['shadow_status']}  shape {'same' if d['same_shape'] else 'differs'}"
                      + (f"  error {d['error']}" if d.get("error") else ""))
        return 0
    if command == "guard":
        return _guard(args, backend)
    config = backend.get()
    if command == "set":
        config = plan_set(config, args.klass, args.pct, pubkey=_pubkey(args), now=now,
                          max_age_s=args.drill_max_age, new_stack=args.new_stack)
    elif command == "step":
        config = plan_step(config, args.classes, soak_s=args.soak, pubkey=_pubkey(args),
                           now=now, max_age_s=args.drill_max_age, new_stack=args.new_stack)
    elif command == "back":
        config = plan_back(config, args.classes, now=now)
    elif command in ("kill", "unkill"):
        config = attrs.evolve(config, kill_switch=command == "kill")
    elif command == "record-drill":
        pubkey = _pubkey(args)
        if pubkey is None:
            raise Unreachable("record-drill needs --drill-pubkey")
        try:
            body = read_enveloped(args.result, pubkey)
        except SignatureError as exc:
            raise Refused(str(exc)) from None
        raw = json.loads(Path(args.result).read_text())
        reason = drill_ok(raw, pubkey, now, args.drill_max_age, args.new_stack)
        if reason is not None:
            raise Refused(reason)
        config = attrs.evolve(config, extra={**config.extra, "drill": raw})
        print(f"recorded the DB-wipe drill of {body.get('finished_at')}")
    _show(backend.put(config))
    return 0


def rollout_command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Refused as exc:
        print(f"eectl rollout: refused: {exc}", file=sys.stderr)
        return 1
    except (Unreachable, ConfigError) as exc:
        print(f"eectl rollout: {exc}", file=sys.stderr)
        return 2


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = groups.add_parser(
        "rollout", help="CP rollouts through the cohort router",
        description="Stage traffic from the old CP stack to the new one per traffic class "
                    f"(stages {' → '.join(map(str, STAGES))}), kill switch, shadow report.")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--router", metavar="URL", help="ee-router (default $EE_ROUTER_URL)")
    where.add_argument("--token-file", metavar="FILE",
                       help="the router's admin token (default $EE_ROUTER_TOKEN)")
    where.add_argument("--cloudflare", action="store_true",
                       help="the Worker's config in Workers KV, through the Cloudflare API")
    where.add_argument("--cf-api", default="https://api.cloudflare.com/client/v4",
                       metavar="URL")
    where.add_argument("--cf-account", metavar="ID")
    where.add_argument("--cf-namespace", metavar="ID", help="the KV namespace bound as ROLLOUT")
    where.add_argument("--cf-token-file", metavar="FILE", help="API token (default $CF_API_TOKEN)")
    gate = argparse.ArgumentParser(add_help=False)
    gate.add_argument("--drill-pubkey", metavar="FILE",
                      help="the Ed25519 public key the DB-wipe drill result must be signed by")
    gate.add_argument("--drill-max-age", type=float, default=DEFAULT_DRILL_MAX_AGE_S,
                      metavar="SECONDS")
    gate.add_argument("--new-stack", metavar="URL",
                      help="the new stack's HTTP API as the router reaches it: the DB-wipe "
                           "drill must have been run against exactly that stack")
    commands = rollout.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("status", parents=[where], help="show the rollout config")
    p = commands.add_parser("set", parents=[where, gate], help="set one class's percentage")
    p.add_argument("klass", metavar="CLASS", help="A B C D or E")
    p.add_argument("pct", type=float, metavar="PCT")
    p = commands.add_parser("step", parents=[where, gate], help="next stage (after the soak)")
    p.add_argument("classes", nargs="*", metavar="CLASS", help="default: every class")
    p.add_argument("--soak", type=float, default=DEFAULT_SOAK_S, metavar="SECONDS",
                   help=f"time at the current stage before the next (default {DEFAULT_SOAK_S:g})")
    p = commands.add_parser("back", parents=[where], help="previous stage")
    p.add_argument("classes", nargs="*", metavar="CLASS", help="default: every class")
    commands.add_parser("kill", parents=[where], help="everything to the old stack, at once")
    commands.add_parser("unkill", parents=[where], help="the percentages apply again")
    p = commands.add_parser("record-drill", parents=[where, gate],
                            help="record a signed DB-wipe drill result (eectl drill db-wipe)")
    p.add_argument("result", metavar="RESULT", help="the drill's --out file")
    p = commands.add_parser("shadow-report", parents=[where],
                            help="shadow read comparisons (ee-router)")
    p.add_argument("--json", action="store_true")
    p = commands.add_parser(
        "guard", parents=[where], help="guardrails with automatic step-back (for the Worker)",
        description="Scrape both stacks' /metrics every --interval seconds and step the "
                    "rollout back when a trigger breaches for its window (triggers: the "
                    "config's \"guardrails\"). ee-router does this itself.")
    p.add_argument("--old-metrics", required=True, metavar="URL",
                   help="the old stack's /metrics")
    p.add_argument("--new-metrics", required=True, metavar="URL",
                   help="the new stack's /metrics")
    p.add_argument("--interval", type=float, default=15.0, metavar="SECONDS")
    p.add_argument("--events", metavar="FILE", help="also append each event (JSON line) here")
    p.add_argument("--passes", type=int, default=None, help=argparse.SUPPRESS)
    for name in ("status", "set", "step", "back", "kill", "unkill", "record-drill",
                 "shadow-report", "guard"):
        commands.choices[name].set_defaults(handler=rollout_command)
