-- 0005_ledger: billing on a double-entry ledger (durable business state).
--
-- Portable SQL (SQLite and PostgreSQL, see ee.cp.store.backend): `INTEGER PRIMARY KEY`
-- becomes an identity column on PostgreSQL; the `-- @sqlite` / `-- @postgresql` blocks
-- hold what differs (the triggers that make the ledger append-only).
--
-- Money is BIGINT minor units (cents for USD). A transaction's entries sum to zero per
-- currency; entries and transactions are never updated or deleted (triggers below);
-- a correction is a new transaction whose `corrects` names the one it corrects.
-- `idempotency_key` is UNIQUE: the same key twice is one transaction.

CREATE TABLE ledger_transactions (
    txn_id          INTEGER PRIMARY KEY,
    idempotency_key TEXT    NOT NULL UNIQUE CHECK (idempotency_key <> ''),
    kind            TEXT    NOT NULL
                    CHECK (kind IN ('charge', 'credit', 'payment', 'correction')),
    at              TEXT    NOT NULL,
    actor           TEXT    NOT NULL CHECK (actor <> ''),
    memo            TEXT    NOT NULL DEFAULT '',
    corrects        BIGINT  REFERENCES ledger_transactions (txn_id),
    data            TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX ledger_transactions_at ON ledger_transactions (at);

CREATE TABLE ledger_entries (
    entry_id INTEGER PRIMARY KEY,
    txn_id   BIGINT  NOT NULL REFERENCES ledger_transactions (txn_id),
    account  TEXT    NOT NULL CHECK (account <> ''),
    currency TEXT    NOT NULL CHECK (length(currency) = 3),
    amount   BIGINT  NOT NULL CHECK (amount <> 0)
);
CREATE INDEX ledger_entries_txn ON ledger_entries (txn_id);
CREATE INDEX ledger_entries_account ON ledger_entries (account, entry_id);

-- Cached balances: updated in the same database transaction as the entries; `eectl
-- billing verify` proves each equal to the sum of its account's entries.
CREATE TABLE ledger_balances (
    account  TEXT   NOT NULL,
    currency TEXT   NOT NULL,
    balance  BIGINT NOT NULL,
    PRIMARY KEY (account, currency)
);

-- One row per (deployment, replica, minute window) ever charged: the primary key is
-- the guarantee that no window is charged twice. `window_start` is the unix minute
-- (unix seconds // 60). Its charge is the transaction keyed 'usage:<id>' (none for a
-- zero-amount window).
CREATE TABLE usage_windows (
    id            INTEGER PRIMARY KEY,
    deployment_id TEXT   NOT NULL,
    replica_id    TEXT   NOT NULL,
    window_start  BIGINT NOT NULL,
    account_id    TEXT   NOT NULL,
    node_size     TEXT   NOT NULL,
    provider      TEXT   NOT NULL,
    price_version BIGINT NOT NULL,
    amount_minor  BIGINT NOT NULL CHECK (amount_minor >= 0),
    currency      TEXT   NOT NULL,
    UNIQUE (deployment_id, replica_id, window_start)
);
CREATE INDEX usage_windows_account ON usage_windows (account_id, id);

-- What the meter saw: a replica running from `started_window` to `seen_window` (the
-- last minute its agent's report showed it running), charged through
-- `charged_through`. `closed` once a report showed it stopped or lost.
CREATE TABLE meter_runs (
    deployment_id   TEXT    NOT NULL,
    replica_id      TEXT    NOT NULL,
    started_window  BIGINT  NOT NULL,
    account_id      TEXT    NOT NULL,
    node_size       TEXT    NOT NULL,
    provider        TEXT    NOT NULL,
    seen_window     BIGINT  NOT NULL,
    charged_through BIGINT  NOT NULL,
    closed          INTEGER NOT NULL DEFAULT 0 CHECK (closed IN (0, 1)),
    PRIMARY KEY (deployment_id, replica_id, started_window),
    CHECK (seen_window >= started_window),
    CHECK (charged_through >= started_window - 1)
);
CREATE INDEX meter_runs_open ON meter_runs (closed, deployment_id, replica_id);

-- Price books, versioned and immutable: a charge records the version it used.
CREATE TABLE price_books (
    version    BIGINT PRIMARY KEY,
    created_at TEXT   NOT NULL,
    actor      TEXT   NOT NULL,
    doc        TEXT   NOT NULL
);

-- Accounts short of funds: since when (unix seconds), and when suspended.
CREATE TABLE billing_holds (
    account_id   TEXT   PRIMARY KEY,
    low_since    BIGINT NOT NULL,
    suspended_at BIGINT
);

-- The last charge passes (for operators: `eectl console` → billing).
CREATE TABLE charge_passes (
    id          INTEGER PRIMARY KEY,
    at          TEXT    NOT NULL,
    cp          TEXT    NOT NULL,
    windows     BIGINT  NOT NULL,
    amount      BIGINT  NOT NULL,
    duration_ms BIGINT  NOT NULL
);

-- @sqlite
CREATE TRIGGER ledger_entries_append_only_u BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END;
CREATE TRIGGER ledger_entries_append_only_d BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END;
CREATE TRIGGER ledger_transactions_append_only_u BEFORE UPDATE ON ledger_transactions
BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END;
CREATE TRIGGER ledger_transactions_append_only_d BEFORE DELETE ON ledger_transactions
BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END;
CREATE TRIGGER usage_windows_append_only_u BEFORE UPDATE ON usage_windows
BEGIN SELECT RAISE(ABORT, 'usage windows are immutable'); END;
CREATE TRIGGER usage_windows_append_only_d BEFORE DELETE ON usage_windows
BEGIN SELECT RAISE(ABORT, 'usage windows are immutable'); END;
-- @end
-- @postgresql
CREATE FUNCTION ee_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME;
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ee_append_only();
CREATE TRIGGER ledger_transactions_append_only BEFORE UPDATE OR DELETE
    ON ledger_transactions FOR EACH ROW EXECUTE FUNCTION ee_append_only();
CREATE TRIGGER usage_windows_append_only BEFORE UPDATE OR DELETE ON usage_windows
    FOR EACH ROW EXECUTE FUNCTION ee_append_only();
-- @end
