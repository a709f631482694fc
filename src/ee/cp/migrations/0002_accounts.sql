-- 0002_accounts: durable business records — tenant and provisioner accounts and their
-- API keys (only a SHA-256 of each key's secret is stored; the key is shown once).

CREATE TABLE accounts (
    account_id TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL CHECK (name <> ''),
    kind       TEXT    NOT NULL CHECK (kind IN ('tenant', 'provisioner')),
    created_at TEXT    NOT NULL,
    balance    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    key_id     TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    secret_sha256 TEXT NOT NULL CHECK (length(secret_sha256) = 64),
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX api_keys_account ON api_keys (account_id);
