-- 0003_rejection_counts: refused registrations are history aggregated per (minute,
-- refusal code) instead of one row per connection, so a peer that keeps connecting
-- with bad registrations cannot grow the store. `at` is the minute (RFC 3339 UTC,
-- seconds zero); `sample_vm_name`/`sample_reason` keep the last one seen, for operators.

CREATE TABLE registration_rejections (
    at             TEXT    NOT NULL,
    code           TEXT    NOT NULL CHECK (code <> ''),
    count          INTEGER NOT NULL CHECK (count > 0),
    sample_vm_name TEXT    NOT NULL,
    sample_reason  TEXT    NOT NULL,
    PRIMARY KEY (at, code)
);
