// EasyEnclave cohort router as a Cloudflare Worker: the same decision as
// src/ee/router/decision.py (keep the two in step; tests/router/test_worker.py feeds
// both 100,000 keys x classes and requires identical answers).
//
// Bindings (wrangler.toml):
//   OLD_ORIGIN, NEW_ORIGIN     the two CP stacks' HTTP APIs (old = stable)
//   OLD_AGENTS, NEW_AGENTS     their agent planes (ws:// or wss:// base), optional
//   ROLLOUT (KV namespace)     key "config": {"kill_switch", "classes", "shadow"}
//   ROLLOUT_CONFIG (text)      fallback config when the KV key is missing
//   ADMIN_TOKEN (secret)       enables POST /_ee/router/decide (batch decisions)
//
// Decision: kill switch first (everything to old); traffic class from method + path
// (CLASS_TABLE, first match); cohort key (account of the API key, the agent's vm_name
// from X-EE-Agent, the dc id from X-EE-DC, an operator token digest, or the client
// address); bucket = first 8 bytes of SHA-256(UTF-8 key), big-endian, mod 10,000; a
// class at pct sends buckets < pct*100 to new. Every answer carries X-EE-CP-Stack.
// A KV write (eectl rollout ... --cloudflare) reaches the edges within KV's
// propagation delay (up to about 60 s); the self-hosted ee-router applies at once.

const BUCKETS = 10000n;
const CLASSES = ["A", "B", "C", "D", "E"];
const STACK_HEADER = "X-EE-CP-Stack";
const CLASS_TABLE = [
  ["*", "^/api/v2/federation(/|$)", "E"],
  ["*", "^/api/v2/agents/connect$", "C"],
  ["*", "^/api/v2/(admin|billing|datacenters)(/|$)", "D"],
  ["*", "^/api/v2/agents(/|$)", "D"],
  ["POST", "^/api/v2/accounts$", "D"],
  ["*", "^/api/v2/capacity/pools(/|$)", "D"],
  ["GET", "^/api/v2/capacity/launch-orders$", "D"],
  ["GET HEAD", "^/", "A"],
  ["*", "^/", "B"],
];
const COMPILED = CLASS_TABLE.map(([m, p, c]) => [m === "*" ? null : m.split(" "), new RegExp(p), c]);
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const EXTRA_FIELDS = ["changed_at", "drill", "guardrails"];
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-authenticate",
  "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
  "host", "proxy-connection"]);
const RESOLVE_TTL_MS = 600000;
const resolved = new Map(); // key id -> {cohort, until, digest}

export class ConfigError extends Error {}

function percent(value, where) {
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0 || value > 100) {
    throw new ConfigError(`${where}: a percentage must be a number in [0, 100]`);
  }
  const points = Math.round(value * 100);
  if (Math.abs(points - value * 100) > 1e-6) {
    throw new ConfigError(`${where}: at most two decimals (one bucket is 0.01 %)`);
  }
  return points;
}

export function parseConfig(doc) {
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new ConfigError("the rollout config must be a JSON object");
  }
  const allowed = new Set(["kill_switch", "classes", "shadow", ...EXTRA_FIELDS]);
  const unknown = Object.keys(doc).filter((k) => !allowed.has(k)).sort();
  if (unknown.length) throw new ConfigError(`unknown field(s): ${unknown.join(", ")}`);
  // a key that is present must hold a valid value: null is refused, as in Python
  const kill = "kill_switch" in doc ? doc.kill_switch : false;
  if (typeof kill !== "boolean") throw new ConfigError("kill_switch: must be true or false");
  const classes = "classes" in doc ? doc.classes : {};
  if (classes === null || typeof classes !== "object" || Array.isArray(classes) ||
      Object.keys(classes).some((c) => !CLASSES.includes(c))) {
    throw new ConfigError(`classes: an object with keys among ${CLASSES.join(", ")}`);
  }
  const points = {};
  for (const c of CLASSES) points[c] = percent(c in classes ? classes[c] : 0, `classes.${c}`);
  const shadow = "shadow" in doc ? doc.shadow : {};
  if (shadow === null || typeof shadow !== "object" || Array.isArray(shadow) ||
      Object.keys(shadow).some((c) => c !== "A")) {
    throw new ConfigError("shadow: only class A (reads) may be shadowed");
  }
  for (const [c, rate] of Object.entries(shadow)) {
    if (typeof rate !== "number" || !Number.isFinite(rate) || rate < 0 || rate > 1) {
      throw new ConfigError(`shadow.${c}: a sample rate in [0, 1]`);
    }
  }
  return { killSwitch: kill, points, shadow };
}

const UNRESERVED = /^[A-Za-z0-9\-._~\/]$/;

// Why a request path (as received, percent-encoding intact) is refused, or null: the
// same rules as decision.path_refusal (a path a URL parser may change on the way).
export function pathRefusal(path) {
  if (!path.startsWith("/")) return "the path must start with '/'";
  if (path.includes("//")) return "the path has an empty segment ('//')";
  if (path.includes("\\")) return "the path has a backslash";
  if (/(?:^|\/)\.{1,2}(?:\/|$)/.test(path)) return "the path has a '.' or '..' segment";
  for (let i = path.indexOf("%"); i >= 0; i = path.indexOf("%", i + 1)) {
    const pair = path.slice(i + 1, i + 3);
    if (!/^[0-9A-Fa-f]{2}$/.test(pair)) return "the path has a malformed percent-encoding";
    if (UNRESERVED.test(String.fromCharCode(parseInt(pair, 16)))) {
      return `the path percent-encodes an unreserved character or '/' (%${pair})`;
    }
  }
  return null;
}

// The path and query exactly as the client sent them (request.url before any
// resolution of "." segments or decoding; "" query when there is none).
function rawTarget(url) {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  if (start < 0) return { path: "/", query: "" };
  let rest = url.slice(start);
  const hash = rest.indexOf("#");
  if (hash >= 0) rest = rest.slice(0, hash);
  const q = rest.indexOf("?");
  return q < 0 ? { path: rest, query: "" } : { path: rest.slice(0, q), query: rest.slice(q) };
}

function badRequest(code, message) {
  return json(400, { error: { code, message, details: {} } });
}

export function classify(method, path) {
  method = method.toUpperCase();
  path = path.split("?", 1)[0].replace(/\/{2,}/g, "/") || "/";
  for (const [methods, pattern, klass] of COMPILED) {
    if ((methods === null || methods.includes(method)) && pattern.test(path)) return klass;
  }
  return "B";
}

const encoder = new TextEncoder();

async function sha256(text) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function bucket(key) {
  const digest = await sha256(key);
  let n = 0n;
  for (let i = 0; i < 8; i++) n = (n << 8n) | BigInt(digest[i]);
  return Number(n % BUCKETS);
}

export async function decide(config, klass, cohort) {
  if (config.killSwitch) return { stack: "old", bucket: null, reason: "kill_switch" };
  if (!cohort) return { stack: "old", bucket: null, reason: "no_cohort" };
  const b = await bucket(cohort);
  if (b < (config.points[klass] ?? 0)) return { stack: "new", bucket: b, reason: "ramped" };
  return { stack: "old", bucket: b, reason: "held" };
}

function bearer(authorization) {
  if (!authorization) return null;
  const space = authorization.indexOf(" ");
  if (space < 0) return null;
  const scheme = authorization.slice(0, space);
  const token = authorization.slice(space + 1).trim();
  return scheme.toLowerCase() === "bearer" && token ? token : null;
}

function tenantKeyId(authorization) {
  const token = bearer(authorization);
  if (token === null) return null;
  const first = token.indexOf("_");
  const second = first < 0 ? -1 : token.indexOf("_", first + 1);
  if (first < 0 || second < 0 || token.slice(0, first) !== "ee") return null;
  const keyId = token.slice(first + 1, second);
  return NAME.test(keyId) ? keyId : null;
}

function nameOrNull(value) {
  return value !== null && NAME.test(value) ? value : null;
}

export async function cohortKey(klass, headers, tenant, client) {
  if (klass === "C") {
    const vm = nameOrNull(headers.get("x-ee-agent"));
    return vm ? `agent:${vm}` : null;
  }
  if (klass === "E") {
    const dc = nameOrNull(headers.get("x-ee-dc"));
    return dc ? `dc:${dc}` : null;
  }
  if (tenant) return tenant;
  const token = bearer(headers.get("authorization"));
  if (token !== null) {
    if (tenantKeyId(headers.get("authorization")) !== null) return null;
    return "operator:" + hex(await sha256(token)).slice(0, 16);
  }
  return client ? `client:${client}` : null;
}

async function resolveTenant(env, authorization) {
  const keyId = tenantKeyId(authorization);
  if (keyId === null) return null;
  const digest = hex(await sha256(authorization));
  const hit = resolved.get(keyId);
  if (hit && hit.until > Date.now() && hit.digest === digest) return hit.cohort;
  let resp;
  try {
    resp = await fetch(`${env.OLD_ORIGIN}/api/v2/accounts/me`, {
      headers: { Authorization: authorization } });
  } catch {
    return null;
  }
  let cohort = null;
  if (resp.status === 200) {
    const body = await resp.json().catch(() => ({}));
    if (typeof body.account_id === "string" && NAME.test(body.account_id)) {
      cohort = `account:${body.account_id}`;
    }
  } else if (resp.status === 403) {
    cohort = `key:${keyId}`;
  }
  if (cohort !== null) {
    if (resolved.size > 100000) resolved.clear();
    resolved.set(keyId, { cohort, until: Date.now() + RESOLVE_TTL_MS, digest });
  }
  return cohort;
}

async function loadConfig(env) {
  let text = null;
  if (env.ROLLOUT) text = await env.ROLLOUT.get("config");
  if (text === null) text = env.ROLLOUT_CONFIG ?? "{}";
  try {
    return parseConfig(JSON.parse(text));
  } catch (err) {
    // a bad document must not take the service down: everything to the stable stack
    console.log(JSON.stringify({ ee_router: "bad_config", error: String(err) }));
    return { killSwitch: true, points: {}, shadow: {} };
  }
}

function json(status, doc, stack) {
  const headers = { "content-type": "application/json" };
  if (stack) headers[STACK_HEADER] = stack;
  return new Response(JSON.stringify(doc), { status, headers });
}

function timingSafeEqual(a, b) {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

async function admin(request, env, url) {
  const given = bearer(request.headers.get("authorization"));
  if (!env.ADMIN_TOKEN) return json(404, { error: { code: "admin_disabled", message: "no ADMIN_TOKEN", details: {} } });
  if (given === null || !timingSafeEqual(given, env.ADMIN_TOKEN)) {
    return json(401, { error: { code: "unauthenticated", message: "the router's admin token is needed", details: {} } });
  }
  const config = await loadConfig(env);
  let items;
  try {
    items = request.method === "POST" ? await request.json() : null;
  } catch {
    return badRequest("bad_request", "a JSON array");
  }
  const pairs = Array.isArray(items) && items.every((i) => Array.isArray(i) && i.length === 2);
  if (url.pathname === "/_ee/router/decide" && request.method === "POST") {
    if (!pairs || !items.every(([k, key]) => CLASSES.includes(k) &&
        (key === null || (typeof key === "string" && !/\p{Surrogate}/u.test(key))))) {
      return badRequest("bad_request", "a JSON array of [class, key]");
    }
    const out = [];
    for (const [klass, key] of items) {
      const d = await decide(config, klass, key);
      out.push([d.stack, d.bucket]);
    }
    return json(200, { decisions: out });
  }
  if (url.pathname === "/_ee/router/classify" && request.method === "POST") {
    if (!pairs || !items.every(([m, p]) => typeof m === "string" && typeof p === "string")) {
      return badRequest("bad_request", "a JSON array of [method, path]");
    }
    return json(200, { classes: items.map(([m, p]) => pathRefusal(p) === null ? classify(m, p) : "refused") });
  }
  return json(404, { error: { code: "not_found", message: `no route ${request.method} ${url.pathname}`, details: {} } });
}

function shape(value, key = "") {
  if (Array.isArray(value)) {
    const seen = [];
    for (const item of value) {
      const s = JSON.stringify(shape(item));
      if (!seen.includes(s)) seen.push(s);
    }
    return seen.map((s) => JSON.parse(s));
  }
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const k of Object.keys(value).sort()) out[k] = shape(value[k], k);
    return out;
  }
  const lower = key.toLowerCase();
  if (["id", "_at", "at", "time", "timestamp", "token", "key", "nonce"].some((s) => lower.endsWith(s))) {
    return "<masked>";
  }
  return value === null ? "NoneType" : typeof value;
}

async function shadowRead(request, env, served, status, body, servedMs) {
  const other = served === "old" ? "new" : "old";
  const origin = other === "old" ? env.OLD_ORIGIN : env.NEW_ORIGIN;
  const url = new URL(request.url);
  const started = Date.now();
  let result;
  try {
    // never anything but a read on the shadow stack
    if (request.method !== "GET" && request.method !== "HEAD") return;
    const raw = rawTarget(request.url);
    const resp = await fetch(origin.replace(/\/+$/, "") + raw.path + raw.query,
      { method: request.method, headers: forwardHeaders(request.headers) });
    const text = await resp.text();
    let same = false;
    try {
      same = JSON.stringify(shape(JSON.parse(text))) === JSON.stringify(shape(JSON.parse(body)));
    } catch {
      same = text === body;
    }
    result = { path: url.pathname, served_stack: served, served_status: status,
      shadow_status: resp.status, served_s: servedMs / 1000, shadow_s: (Date.now() - started) / 1000,
      same_status: status === resp.status, same_shape: same };
  } catch (err) {
    result = { path: url.pathname, served_stack: served, error: String(err) };
  }
  console.log(JSON.stringify({ ee_shadow: result }));
}

function forwardHeaders(headers) {
  const out = new Headers();
  for (const [k, v] of headers) if (!HOP_BY_HOP.has(k.toLowerCase())) out.set(k, v);
  return out;
}

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    // classify, route and forward one string: the path exactly as received
    const raw = rawTarget(request.url);
    const refusal = pathRefusal(raw.path);
    if (refusal !== null) return badRequest("bad_path", refusal);
    if (raw.path.startsWith("/_ee/router/")) return admin(request, env, url);
    const upgrade = (request.headers.get("upgrade") ?? "").toLowerCase() === "websocket";
    const klass = classify(upgrade ? "GET" : request.method, raw.path);
    let tenant = null;
    if (klass !== "C" && klass !== "E" && request.headers.has("authorization")) {
      tenant = await resolveTenant(env, request.headers.get("authorization"));
    }
    const config = await loadConfig(env);
    const cohort = await cohortKey(klass, request.headers, tenant,
      request.headers.get("cf-connecting-ip"));
    const { stack } = await decide(config, klass, cohort);
    let origin = stack === "old" ? env.OLD_ORIGIN : env.NEW_ORIGIN;
    if (klass === "C") {
      const agents = stack === "old" ? env.OLD_AGENTS : env.NEW_AGENTS;
      if (agents) origin = agents.replace(/^ws/, "http");
    }
    const target = origin.replace(/\/+$/, "") + raw.path + raw.query;
    const headers = forwardHeaders(request.headers);
    if (upgrade) {
      headers.set("Upgrade", "websocket");
      const resp = await fetch(target, { headers });
      if (resp.status !== 101 || !resp.webSocket) {
        return json(502, { error: { code: "upstream_refused_upgrade", message: `the ${stack} stack refused the websocket`, details: { stack } } }, stack);
      }
      const out = new Headers(resp.headers);
      out.set(STACK_HEADER, stack);
      return new Response(null, { status: 101, webSocket: resp.webSocket, headers: out });
    }
    const started = Date.now();
    let resp;
    try {
      resp = await fetch(target, { method: request.method, headers,
        body: ["GET", "HEAD"].includes(request.method) ? undefined : request.body,
        redirect: "manual" });
    } catch (err) {
      return json(502, { error: { code: "upstream_unavailable", message: `the ${stack} CP stack did not answer`, details: { stack } } }, stack);
    }
    const out = new Headers(resp.headers);
    out.set(STACK_HEADER, stack);
    const rate = config.shadow.A ?? 0;
    if (klass === "A" && rate > 0 && Math.random() < rate &&
        (request.method === "GET" || request.method === "HEAD")) {
      const [mine, theirs] = resp.body ? resp.body.tee() : [null, null];
      ctx.waitUntil(new Response(theirs).text().then((text) =>
        shadowRead(request, env, stack, resp.status, text, Date.now() - started)));
      return new Response(mine, { status: resp.status, headers: out });
    }
    return new Response(resp.body, { status: resp.status, headers: out });
  },
};
