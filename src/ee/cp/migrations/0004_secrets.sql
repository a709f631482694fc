-- 0004_secrets: tenant secrets (durable business state, ee.cp.secrets). Values are
-- only ever stored sealed: AES-GCM under the CP data key, which is itself stored only
-- wrapped by the wrapping key kept outside this store. Blobs are base64 TEXT and
-- counters BIGINT so the same file runs on PostgreSQL. One row per (app, secret): a
-- new version replaces the sealed value of the previous one (which is not kept).

CREATE TABLE secret_data_keys (
    key_id     TEXT PRIMARY KEY,
    wrapped    TEXT NOT NULL CHECK (wrapped <> ''),
    created_at TEXT NOT NULL
);

CREATE TABLE secrets (
    app_key    TEXT   NOT NULL CHECK (app_key <> ''),
    name       TEXT   NOT NULL CHECK (name <> ''),
    version    BIGINT NOT NULL CHECK (version > 0),
    key_id     TEXT   NOT NULL REFERENCES secret_data_keys (key_id),
    sealed     TEXT   NOT NULL CHECK (sealed <> ''),
    updated_at TEXT   NOT NULL,
    PRIMARY KEY (app_key, name)
);

CREATE TABLE secret_policies (
    app_key    TEXT PRIMARY KEY,
    policy     TEXT NOT NULL DEFAULT '{}',
    updated_at TEXT NOT NULL
);

-- The tenant-visible audit trail of releases, refusals and revocations (never values).
CREATE TABLE secret_audit (
    audit_id      TEXT   PRIMARY KEY,
    at            TEXT   NOT NULL,
    app_key       TEXT   NOT NULL,
    action        TEXT   NOT NULL CHECK (action IN ('released', 'refused', 'revoked',
                                                    'updated', 'deleted')),
    secret        TEXT,
    version       BIGINT,
    deployment_id TEXT,
    agent_id      TEXT,
    actor         TEXT   NOT NULL,
    code          TEXT,
    reason        TEXT   NOT NULL DEFAULT ''
);
CREATE INDEX secret_audit_app_at ON secret_audit (app_key, at);
