-- The people table: the one definition of how a person is stored.
-- Written in SQLite's dialect; models.create_schema() rewrites the key line for PostgreSQL,
-- whose identity column (like AUTOINCREMENT here) never hands out an id twice.
-- The CHECKs repeat the field rules of models.FIELDS so that no writer, however it
-- reaches the database, can store a person the API would refuse; a test keeps them equal.
-- version counts updates: it is the ETag and is never shown in the representation.
CREATE TABLE IF NOT EXISTS people (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    age     INTEGER NOT NULL CHECK (age BETWEEN 0 AND 150),
    locale  TEXT    NOT NULL CHECK (length(locale) BETWEEN 1 AND 64),
    version INTEGER NOT NULL DEFAULT 1
);
-- The list filters with an index: each walks its matches in id order, so a page of them costs
-- what a page of everyone costs. Age has none: a filtered page examines a bounded number of rows in
-- id order instead (models.People.find_page), and the indexes cost every insert (README, Performance).
CREATE INDEX IF NOT EXISTS people_name ON people (name, id);
CREATE INDEX IF NOT EXISTS people_locale ON people (locale, id);

-- API tokens: only a SHA-256 of each secret is kept. Every worker and every instance on one
-- PostgreSQL reads this table, so a token works (and a revocation reaches) everywhere.
-- A revoked token stays, with when (0: live), so who had access stays answerable and no name or
-- secret comes back. Use is counted by each worker and added here at most once a minute.
-- Columns are only ever added at the end: init-db adds them to an older table (models.create_schema).
CREATE TABLE IF NOT EXISTS tokens (
    name         TEXT    NOT NULL PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    secret_hash  TEXT    NOT NULL UNIQUE,
    scope        TEXT    NOT NULL CHECK (scope IN ('read', 'write')),
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    revoked_at   BIGINT  NOT NULL DEFAULT 0,
    last_used_at BIGINT  NOT NULL DEFAULT 0,
    requests     BIGINT  NOT NULL DEFAULT 0
);

-- Idempotency keys of creates: a retried create with the same key gets the first answer back.
-- Kept for 24 hours; fingerprint is a SHA-256 of the validated body.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT    NOT NULL PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint TEXT    NOT NULL,
    response    TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
