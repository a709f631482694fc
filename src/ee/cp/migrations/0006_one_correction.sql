-- 0006_one_correction: a transaction is corrected at most once.
--
-- `corrects` names the transaction a correction reverses; without this index the same
-- transaction could be reversed any number of times (under different idempotency keys),
-- moving the money again each time. A partial unique index (SQLite and PostgreSQL both
-- have them) leaves the many rows whose `corrects` is NULL alone.

CREATE UNIQUE INDEX ledger_transactions_corrects ON ledger_transactions (corrects)
    WHERE corrects IS NOT NULL;
