"""`eectl console`: the operator REPL over the CP's admin API.

On a terminal it is a prompt_toolkit session (completion of command names, agent ids
from the last listing and actor names from the last tree; history in
``$XDG_STATE_HOME/easyenclave/console_history``). When stdin is not a terminal it reads
one command per line and prints only command output, no prompt, so it can be scripted:

    printf 'agents\\ntree\\n' | eectl console --token-file data/admin.token

A failing command prints one line on stderr and the loop goes on. A scripted session
exits 1 if any command failed, else 0; an interactive one exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TextIO

import attrs
import trio
import trio_websocket

from ee.ctl._table import cell, records_table, short_hash, table
from ee.ctl.client import (
    CpClient,
    CpError,
    CpUnreachable,
    CtlError,
    Json,
    add_cp_options,
    client_from_args,
)

PROMPT = "ee> "
CRASH_RESTART_WAIT_S = 3.0


class ConsoleUsage(CtlError):
    """A command line the console cannot run (unknown command, wrong arguments)."""


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = groups.add_parser(
        "console", help="operator REPL (agents, tree, events, drain, chaos)",
        description=(
            "Operator REPL over the CP's admin API. Reads commands from a terminal with "
            "completion and history, or one per line from a pipe (no prompt; exit 1 if "
            "any command failed). Type 'help' for the commands."
        ),
    )
    add_cp_options(console)
    console.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        client = client_from_args(args)
    except CtlError as exc:
        print(f"eectl console: {exc}", file=sys.stderr)
        return exc.exit_code
    with client:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        console = Console(client, interactive=interactive)
        return console.run()


# --- history location, line readers ------------------------------------------------


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "easyenclave" / "console_history"


def pipe_reader(stream: TextIO) -> Callable[[str], str]:
    """Read lines with no prompt (scripts); EOFError at the end of input."""

    def read(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


def terminal_reader(console: Console) -> Callable[[str], str]:
    """A prompt_toolkit session with completion and a history file."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory

    history: History
    try:
        path = history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(
        history=history, completer=_completer(console), complete_while_typing=False)

    def read(prompt: str) -> str:
        return session.prompt(prompt)

    return read


def _completer(console: Console) -> Any:
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion
    from prompt_toolkit.document import Document

    class ConsoleCompleter(Completer):
        def get_completions(self, document: Document,
                            complete_event: CompleteEvent) -> Iterator[Completion]:
            for word, start in console.completions(document.text_before_cursor):
                yield Completion(word, start_position=start)

    return ConsoleCompleter()


# --- the console -------------------------------------------------------------------


@attrs.frozen
class Command:
    name: str
    args: str
    help: str
    run: Callable[[list[str]], None]
    completes: str | None = None  # "agents" or "actors": what the argument completes to


@attrs.define
class Console:
    client: CpClient
    interactive: bool = False
    out: TextIO = attrs.field(factory=lambda: sys.stdout)
    err: TextIO = attrs.field(factory=lambda: sys.stderr)
    read_line: Callable[[str], str] | None = None
    agent_ids: list[str] = attrs.field(factory=list)  # from the last listing
    vm_names: dict[str, str] = attrs.field(factory=dict)  # agent id -> vm name
    actor_names: list[str] = attrs.field(factory=list)  # from the last tree
    failures: int = 0
    commands: dict[str, Command] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for command in (
            Command("help", "[COMMAND]", "list the commands, or explain one", self.cmd_help),
            Command("agents", "", "list agents: vm, size, datacenter, status, attestation",
                    self.cmd_agents),
            Command("agent", "ID", "one agent in detail (an id prefix or vm name will do)",
                    self.cmd_agent, "agents"),
            Command("apps", "", "list apps (tenant route; needs a token that may list them)",
                    self.cmd_apps),
            Command("deployments", "", "replicas running on agents, by deployment",
                    self.cmd_deployments),
            Command("datacenters", "", "per datacenter: agents by status, attestation "
                    "counts, degraded; mode (direct/federated), dc link, sync lag, spool",
                    self.cmd_datacenters),
            Command("pools", "", "capacity pools: warm, reserved, orders, shortfall vs target",
                    self.cmd_pools),
            Command("orders", "", "launch orders with their state", self.cmd_orders),
            Command("billing", "", "balances, holds (low balance / suspended), last charge "
                    "passes", self.cmd_billing),
            Command("tree", "", "the CP's supervision tree with restarts and mailbox depth",
                    self.cmd_tree),
            Command("events", "[N]", "stream live events until Ctrl-C/EOF, or show at most N "
                    "(the recent ones; stops when the stream is quiet)",
                    self.cmd_events),
            Command("drain", "ID", "stop new placements on an agent", self.cmd_drain,
                    "agents"),
            Command("undrain", "ID", "allow placements on an agent again", self.cmd_undrain,
                    "agents"),
            Command("crash", "NAME", "chaos: crash an actor (e.g. agent/ag-…); asks to confirm",
                    self.cmd_crash, "actors"),
            Command("names", "", "VM names and the session keys they are bound to",
                    self.cmd_names),
            Command("release-name", "NAME", "let a new key register as VM NAME (after a "
                    "rebuild, or a held name); asks to confirm", self.cmd_release_name),
            Command("quit", "", "leave the console (also 'exit', EOF)", self.cmd_quit),
        ):
            self.commands[command.name] = command
        self.commands["exit"] = attrs.evolve(self.commands["quit"], name="exit")

    # The loop.

    def run(self) -> int:
        if self.read_line is None:
            self.read_line = (terminal_reader(self) if self.interactive
                              else pipe_reader(sys.stdin))
        if self.interactive:
            self.banner()
        while True:
            try:
                line = self.read_line(PROMPT if self.interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                if not self.interactive:
                    return 130  # Ctrl-C ends a script
                continue  # on a terminal it clears the line
            try:
                self.execute(line)
            except _Quit:
                break
        if self.interactive:
            return 0
        return 1 if self.failures else 0

    def banner(self) -> None:
        try:
            health = self.client.health()
        except CtlError as exc:
            self.fail(str(exc))
            return
        self.say(f"EasyEnclave CP at {self.client.base_url} (role {health.get('role')}, "
                 f"version {health.get('version')}). Type 'help'; Tab completes.")

    def execute(self, line: str) -> None:
        line = line.strip()
        if not line or line.startswith("#"):
            return
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.fail(f"cannot parse the line: {exc}")
            return
        name, args = words[0], words[1:]
        command = self.commands.get(name)
        if command is None:
            self.fail(f"unknown command {name!r}; type 'help' for the list")
            return
        try:
            command.run(args)
        except CtlError as exc:
            self.fail(str(exc))
        except KeyboardInterrupt:
            self.say("")  # Ctrl-C ends the command, not the console

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def fail(self, message: str) -> None:
        self.failures += 1
        print(f"error: {message}", file=self.err, flush=True)

    def ask(self, prompt: str) -> str:
        assert self.read_line is not None
        if not self.interactive:
            self.say(prompt)
        return self.read_line(prompt + " " if self.interactive else "")

    # Completion (pure: used by the prompt_toolkit completer and tests).

    def completions(self, text: str) -> Iterable[tuple[str, int]]:
        """``(word, start_position)`` pairs completing the last word of *text*."""
        words = text.split()
        current = "" if not words or text[-1:].isspace() else words[-1]
        position = len(words) if current == "" else len(words) - 1
        if position == 0:
            return [(name, -len(current)) for name in sorted(self.commands)
                    if name.startswith(current)]
        command = self.commands.get(words[0])
        if command is None or position != 1:
            return []
        if command.completes == "agents":
            candidates = self.agent_ids
        elif command.completes == "actors":
            candidates = self.actor_names
        elif command.name == "help":
            candidates = sorted(self.commands)
        else:
            candidates = []
        return [(c, -len(current)) for c in candidates if c.startswith(current)]

    def resolve_agent(self, ident: str) -> str:
        """An agent id from an id, a unique id prefix or a vm name (last listing)."""
        if ident in self.agent_ids:
            return ident
        if not self.agent_ids:
            self.remember_agents(self.client.agents())
        by_vm = [aid for aid, vm in self.vm_names.items() if vm == ident]
        if len(by_vm) == 1:
            return by_vm[0]
        matches = [aid for aid in self.agent_ids if aid.startswith(ident)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConsoleUsage(f"{ident!r} matches {len(matches)} agents: "
                               f"{', '.join(matches[:4])}{'…' if len(matches) > 4 else ''}")
        return ident  # let the CP say whether it exists

    def remember_agents(self, agents: list[Json]) -> None:
        self.agent_ids = [str(a.get("agent_id")) for a in agents if a.get("agent_id")]
        self.vm_names = {str(a["agent_id"]): str(a.get("vm_name"))
                         for a in agents if a.get("agent_id")}

    # Commands.

    def _no_args(self, name: str, args: list[str]) -> None:
        if args:
            raise ConsoleUsage(f"'{name}' takes no arguments")

    def _one_arg(self, name: str, args: list[str]) -> str:
        command = self.commands[name]
        if len(args) != 1:
            raise ConsoleUsage(f"usage: {name} {command.args}")
        return args[0]

    def cmd_help(self, args: list[str]) -> None:
        if args:
            command = self.commands.get(args[0])
            if command is None:
                raise ConsoleUsage(f"unknown command {args[0]!r}; type 'help' for the list")
            self.say(f"{command.name} {command.args}".rstrip() + f"  —  {command.help}")
            return
        self.say("commands:")
        rows = [(f"{c.name} {c.args}".rstrip(), c.help)
                for name, c in self.commands.items() if name != "exit"]
        self.say(table(None, rows, indent="  "))

    def cmd_agents(self, args: list[str]) -> None:
        self._no_args("agents", args)
        agents = self.client.agents()
        self.remember_agents(agents)
        if not agents:
            self.say("no agents")
            return
        self.say(agents_table(agents))

    def cmd_agent(self, args: list[str]) -> None:
        agent_id = self.resolve_agent(self._one_arg("agent", args))
        self.say(agent_detail(self.client.agent(agent_id)))

    def cmd_apps(self, args: list[str]) -> None:
        """With the admin token: every tenant's apps, from the supervision tree (AppActor
        per app) and the agents' replicas. With a tenant key: GET /api/v2/apps."""
        self._no_args("apps", args)
        try:
            root = self.client.tree()
        except CpError as exc:
            if exc.status not in (401, 403):
                raise
            apps = self.client.apps()
            self.say(records_table(apps, preferred=("name", "account_id", "versions",
                                                    "deployments", "created_at"))
                     if apps else "no apps")
            return
        agents = self.client.agents()
        self.remember_agents(agents)
        rows = app_rows(root, agents)
        self.say(table(("APP", "ACCOUNT", "ACTOR", "RESTARTS", "MAILBOX", "REPLICAS"),
                       rows) if rows else "no apps")

    def cmd_deployments(self, args: list[str]) -> None:
        self._no_args("deployments", args)
        agents = self.client.agents()
        self.remember_agents(agents)
        rows = deployment_rows(agents)
        if not rows:
            self.say("no deployments on any agent")
            return
        self.say(table(("DEPLOYMENT", "APP", "VERSION", "STATE", "AGENT", "VM", "COMPOSE"),
                       rows))

    def cmd_datacenters(self, args: list[str]) -> None:
        self._no_args("datacenters", args)
        dcs = self.client.datacenters()
        self.say(datacenters_table(dcs) if dcs else "no datacenters")

    def cmd_pools(self, args: list[str]) -> None:
        from ee.ctl.capacity import pools_table

        self._no_args("pools", args)
        pools = self.client.get("/api/v2/capacity/pools")["pools"]
        self.say(pools_table(pools) if pools else "no capacity pools")

    def cmd_orders(self, args: list[str]) -> None:
        from ee.ctl.capacity import orders_table

        self._no_args("orders", args)
        orders = self.client.get("/api/v2/capacity/launch-orders")["orders"]
        self.say(orders_table(orders) if orders else "no launch orders")

    def cmd_billing(self, args: list[str]) -> None:
        from ee.ctl.billing import billing_overview

        self._no_args("billing", args)
        self.say(billing_overview(self.client.get("/api/v2/admin/billing")))

    def cmd_tree(self, args: list[str]) -> None:
        self._no_args("tree", args)
        root = self.client.tree()
        self.actor_names = [node["name"] for node, _ in walk_tree(root)]
        self.say(tree_table(root))

    def cmd_events(self, args: list[str]) -> None:
        if len(args) > 1 or (args and not args[0].isdigit()):
            raise ConsoleUsage("usage: events [N]")
        limit = int(args[0]) if args else None
        watch_stdin = limit is None and self.interactive
        if limit is None:
            self.say("streaming events; Ctrl-C " + ("or Ctrl-D " if watch_stdin else "")
                     + "to stop")
        try:
            trio.run(stream_events, self.client, limit,
                     lambda event: self.say(event_line(event)), watch_stdin)
        except KeyboardInterrupt:
            self.say("")

    def cmd_drain(self, args: list[str]) -> None:
        self._set_drain(self.resolve_agent(self._one_arg("drain", args)), True)

    def cmd_undrain(self, args: list[str]) -> None:
        self._set_drain(self.resolve_agent(self._one_arg("undrain", args)), False)

    def _set_drain(self, agent_id: str, draining: bool) -> None:
        view = self.client.drain(agent_id, draining)
        self.say(f"{agent_id} ({view.get('vm_name')}): draining "
                 f"{cell(view.get('draining'))}")

    def cmd_crash(self, args: list[str]) -> None:
        name = self._one_arg("crash", args)
        try:
            again = self.ask(f"chaos: crash {name!r}? type the name again to confirm:")
        except EOFError:
            again = ""
        if again.strip() != name:
            raise ConsoleUsage(f"not confirmed; {name} was not crashed")
        before = restarts_of(self.client.tree(), name)
        self.client.crash(name)
        deadline = time.monotonic() + CRASH_RESTART_WAIT_S
        after = before
        while time.monotonic() < deadline:
            after = restarts_of(self.client.tree(), name)
            if after is not None and before is not None and after > before:
                break
            time.sleep(0.05)
        if after is not None and before is not None and after > before:
            self.say(f"crashed {name}; its supervisor restarted it (restarts {after})")
        else:
            self.say(f"crashed {name}; not restarted yet (see 'tree')")

    def cmd_names(self, args: list[str]) -> None:
        self._no_args("names", args)
        self.say(names_table(self.client.vm_names()))

    def cmd_release_name(self, args: list[str]) -> None:
        name = self._one_arg("release-name", args)
        try:
            again = self.ask(f"release VM name {name!r}: the next key to register under it "
                             "owns it. Type the name again to confirm:")
        except EOFError:
            again = ""
        if again.strip() != name:
            raise ConsoleUsage(f"not confirmed; {name} was not released")
        self.say(release_line(self.client.release_name(name)))

    def cmd_quit(self, args: list[str]) -> None:
        raise _Quit


class _Quit(Exception):
    pass


# --- views (pure) ------------------------------------------------------------------


def agents_table(agents: list[Json]) -> str:
    rows = []
    for a in agents:
        att = a.get("attestation") or {}
        deps = a.get("deployment") or []
        rows.append((a.get("agent_id"), a.get("vm_name"), a.get("node_size"),
                     a.get("datacenter"), a.get("status"), att.get("verdict"),
                     a.get("draining"),
                     ",".join(f"{d.get('app')}@{d.get('version')}" for d in deps),
                     a.get("last_heartbeat")))
    return table(("AGENT", "VM", "SIZE", "DATACENTER", "STATUS", "ATTEST", "DRAINING",
                  "DEPLOYMENT", "LAST HEARTBEAT"), rows)


def names_table(names: list[Json]) -> str:
    rows = [(n.get("vm_name"), n.get("state"), short_hash(n.get("key_sha256")),
             n.get("agent_id"), n.get("problem")) for n in names]
    return table(("VM", "STATE", "KEY", "AGENT", "PROBLEM"), rows)


def release_line(answer: Json) -> str:
    released = answer.get("released") or {}
    line = (f"released {released.get('vm_name')} (was {released.get('state')}, key "
            f"{short_hash(released.get('key_sha256'))}); the next key to register owns it")
    if answer.get("connected"):
        line += "; an agent of that name is still connected"
    return line


def agent_detail(view: Json) -> str:
    att = view.get("attestation") or {}
    health = view.get("health") or {}
    fields: list[tuple[str, Any]] = [
        ("agent_id", view.get("agent_id")),
        ("vm_name", view.get("vm_name")),
        ("node_size", view.get("node_size")),
        ("datacenter", view.get("datacenter")),
        ("gpu", view.get("gpu")),
        ("status", view.get("status")),
        ("lifecycle", view.get("lifecycle")),
        ("draining", view.get("draining")),
        ("attestation", f"{cell(att.get('verdict'))} (provider {cell(att.get('provider'))}, "
                        f"tcb {cell(att.get('tcb_status'))}, "
                        f"verified {cell(att.get('verified_at'))})"),
        ("mrtd", att.get("mrtd")),
        ("violations", att.get("violations")),
        ("quarantine", att.get("quarantine_reasons")),
        ("health", f"{cell(health.get('status'))} {health.get('detail') or ''}".rstrip()),
        ("last_heartbeat", f"{cell(view.get('last_heartbeat'))} "
                           f"(seq {cell(view.get('heartbeat_seq'))}, "
                           f"age {cell(view.get('heartbeat_age_s'))} s)"),
    ]
    lines = [f"{key:>15}: {cell(value)}" for key, value in fields]
    for d in view.get("deployment") or []:
        lines.append(f"{'deployment':>15}: {d.get('deployment_id')} {d.get('app')}@"
                     f"{d.get('version')} {d.get('state')} {short_hash(d.get('compose_hash'))}")
    return "\n".join(lines)


def deployment_rows(agents: list[Json]) -> list[tuple[Any, ...]]:
    rows = []
    for a in agents:
        for d in a.get("deployment") or []:
            rows.append((d.get("deployment_id"), d.get("app"), d.get("version"),
                         d.get("state"), a.get("agent_id"), a.get("vm_name"),
                         short_hash(d.get("compose_hash"))))
    return sorted(rows, key=lambda r: (cell(r[0]), cell(r[4])))


def datacenters_table(dcs: list[Json]) -> str:
    rows = []
    for dc in dcs:
        agents = dc.get("agents") or {}
        att = dc.get("attestation") or {}
        rows.append((dc.get("datacenter"), agents.get("total"), agents.get("online"),
                     agents.get("stale"), agents.get("offline"), agents.get("quarantined"),
                     att.get("pass"), att.get("fail"), dc.get("degraded"),
                     # federation: how the master sees a dc CP's link (direct: 0 lag)
                     dc.get("mode", "direct"), dc.get("connected", "-"),
                     dc.get("sync_lag_s", 0.0), dc.get("spool_depth", 0)))
    return table(("DATACENTER", "AGENTS", "ONLINE", "STALE", "OFFLINE", "QUARANTINED",
                  "ATTEST PASS", "ATTEST FAIL", "DEGRADED", "MODE", "LINK", "LAG S",
                  "SPOOL"), rows)


def walk_tree(node: Json, prefix: str = "", last: bool = True,
              root: bool = True) -> Iterator[tuple[Json, str]]:
    """Depth-first ``(node, drawn name)`` with box-drawing indentation."""
    name = str(node.get("name", "?"))
    drawn = name if root else f"{prefix}{'└─ ' if last else '├─ '}{name}"
    yield node, drawn
    children = node.get("children") or []
    child_prefix = "" if root else prefix + ("   " if last else "│  ")
    for i, child in enumerate(children):
        yield from walk_tree(child, child_prefix, i == len(children) - 1, root=False)


def tree_table(root: Json) -> str:
    rows = []
    for node, drawn in walk_tree(root):
        kind = node.get("kind")
        if node.get("strategy"):
            kind = f"{kind} ({node['strategy']})"
        rows.append((drawn, kind, node.get("state"), node.get("restarts"),
                     node.get("mailbox_depth"), node.get("last_error")))
    return table(("NAME", "KIND", "STATE", "RESTARTS", "MAILBOX", "LAST ERROR"), rows)


def app_rows(root: Json, agents: list[Json]) -> list[tuple[Any, ...]]:
    """One row per AppActor (``app/<account>.<name>``) with its running replica count."""
    running: dict[str, int] = {}
    placed: dict[str, int] = {}
    for agent in agents:
        for d in agent.get("deployment") or []:
            key = str(d.get("app"))
            placed[key] = placed.get(key, 0) + 1
            running[key] = running.get(key, 0) + (d.get("state") == "running")
    rows = []
    for node, _ in walk_tree(root):
        name = str(node.get("name"))
        if not name.startswith("app/"):
            continue
        key = name.removeprefix("app/")
        account, _, app = key.rpartition(".")
        replicas = f"{running.get(key, 0)}/{placed.get(key, 0)} running"
        rows.append((app, account, node.get("state"), node.get("restarts"),
                     node.get("mailbox_depth"), replicas))
    return rows


def restarts_of(root: Json, name: str) -> int | None:
    for node, _ in walk_tree(root):
        if node.get("name") == name:
            restarts = node.get("restarts")
            return restarts if isinstance(restarts, int) else None
    return None


def event_line(event: Json) -> str:
    at = str(event.get("at") or "")
    clock = at[11:19] if len(at) >= 19 else at
    data = event.get("data") or {}
    details = " ".join(f"{k}={cell(v)}" for k, v in data.items() if v not in (None, "", []))
    return (f"#{cell(event.get('seq'))} {clock} {cell(event.get('kind'))} "
            f"{cell(event.get('subject'))} {details}").rstrip()


# --- the events websocket ----------------------------------------------------------


#: With a limit (``events N``), the stream ends when no event came for this long: the CP
#: sends its recent events at once, so fewer than N never means waiting forever.
EVENTS_QUIET_S: Final = 1.0


async def stream_events(client: CpClient, limit: int | None,
                        on_event: Callable[[Json], None], watch_stdin: bool = False,
                        quiet_s: float = EVENTS_QUIET_S) -> int:
    """Print events from WS /api/v2/admin/events until *limit* are shown (or, with a
    limit, none came for *quiet_s*), the CP closes the stream, or (``watch_stdin``)
    stdin reaches EOF. Returns how many were shown."""
    url = client.events_url()
    headers = [(b"Authorization", f"Bearer {client.token}".encode())] if client.token else []
    shown = 0
    try:
        async with (trio_websocket.open_websocket_url(url, extra_headers=headers) as ws,
                    trio.open_nursery() as nursery):
            if watch_stdin:
                nursery.start_soon(_cancel_on_stdin_eof, nursery.cancel_scope)
            while limit is None or shown < limit:
                message = await _next_message(ws, None if limit is None else quiet_s)
                if message is None:
                    break  # quiet: every recent event is shown
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    on_event(event)
                    shown += 1
            nursery.cancel_scope.cancel()
    except trio_websocket.ConnectionRejected as exc:
        raise _rejected_error(exc) from None
    except trio_websocket.HandshakeError as exc:
        raise CpUnreachable(url, str(exc) or type(exc).__name__) from None
    except OSError as exc:
        raise CpUnreachable(url, exc.strerror or str(exc)) from None
    return shown


async def _next_message(ws: trio_websocket.WebSocketConnection,
                        quiet_s: float | None) -> str | bytes | None:
    """The next message, or None when none came within *quiet_s* (None: wait)."""
    with trio.move_on_after(math.inf if quiet_s is None else quiet_s):
        try:
            return await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed_error(exc.reason) from None
    return None


def _closed_error(reason: Any) -> CtlError:
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or getattr(reason, "name", None) or "closed"
    if code == 1008:
        return CpError(403, "forbidden", f"the CP closed the events stream: {text}")
    if code in (1000, 1001):
        return CpError(503, "closed", f"the CP ended the events stream ({text})")
    return CpError(502, "closed", f"the events stream closed: {text} ({code})")


def _rejected_error(exc: trio_websocket.ConnectionRejected) -> CtlError:
    status = int(exc.status_code or 0)
    body = (exc.body or b"").decode(errors="replace")
    try:
        err = json.loads(body).get("error", {})
        return CpError(status, str(err.get("code") or "rejected"),
                       str(err.get("message") or "events stream refused"))
    except (ValueError, AttributeError):
        pass
    if status in (401, 403):
        return CpError(status, "forbidden", "the events stream needs the admin token")
    return CpError(status, "rejected", f"the CP refused the events stream: {body[:100]}")


async def _cancel_on_stdin_eof(scope: trio.CancelScope) -> None:
    fd = sys.stdin.fileno()
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 4096):
            scope.cancel()
            return


__all__ = [
    "Command",
    "Console",
    "agent_detail",
    "agents_table",
    "app_rows",
    "datacenters_table",
    "deployment_rows",
    "event_line",
    "history_path",
    "register",
    "stream_events",
    "tree_table",
    "walk_tree",
]
