-- 0001_initial: the record store's first schema.
--
-- History only (events, registration outcomes) plus the audit trail. Liveness never
-- reads these tables. Timestamps are RFC 3339 UTC text of fixed width
-- ('2026-01-02T03:04:05.000006Z'), so text order is time order and `at` indexes
-- serve range scans. JSON columns hold canonical JSON (ee.protocol.canonical).
--
-- The migration runner wraps this file in a transaction and records it in
-- schema_migrations; do not put BEGIN/COMMIT here.

CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at TEXT    NOT NULL
);

CREATE TABLE events (
    id       INTEGER PRIMARY KEY,
    at       TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind <> ''),
    subject  TEXT    NOT NULL,
    severity TEXT    NOT NULL
             CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    data     TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_kind_at ON events (kind, at);
CREATE INDEX events_subject_at ON events (subject, at);

CREATE TABLE registrations (
    id         INTEGER PRIMARY KEY,
    at         TEXT    NOT NULL,
    vm_name    TEXT    NOT NULL CHECK (vm_name <> ''),
    agent_id   TEXT,
    datacenter TEXT    NOT NULL,
    node_size  TEXT    NOT NULL,
    outcome    TEXT    NOT NULL CHECK (outcome IN ('admitted', 'rejected')),
    reasons    TEXT    NOT NULL DEFAULT '[]',
    mrtd       TEXT,
    tcb_status TEXT
);
CREATE INDEX registrations_at ON registrations (at);
CREATE INDEX registrations_vm_name_at ON registrations (vm_name, at);

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     TEXT    NOT NULL,
    actor  TEXT    NOT NULL CHECK (actor <> ''),
    action TEXT    NOT NULL CHECK (action <> ''),
    target TEXT    NOT NULL,
    data   TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_actor_at ON audit (actor, at);
CREATE INDEX audit_target_at ON audit (target, at);
