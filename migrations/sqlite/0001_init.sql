-- Training jobs, their per-step metrics, validations, checkpoints, and uploaded corpora.
-- Timestamps are ISO-8601 UTC strings written by SQLite.

CREATE TABLE jobs (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    name               TEXT    NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')),
    priority           INTEGER NOT NULL DEFAULT 0,
    spec_json          TEXT    NOT NULL,
    run_dir            TEXT,
    worker             TEXT,
    device             TEXT,
    attempts           INTEGER NOT NULL DEFAULT 0,
    error              TEXT,
    total_steps        INTEGER,
    current_step       INTEGER NOT NULL DEFAULT 0,
    resumed_from_step  INTEGER NOT NULL DEFAULT 0,
    current_epoch      INTEGER NOT NULL DEFAULT 0,
    current_loss       REAL,
    current_lr         REAL,
    loss_scale         REAL,
    skipped_steps      INTEGER NOT NULL DEFAULT 0,
    tokens_per_s       REAL,
    step_ms            REAL,
    last_val_loss      REAL,
    last_bleu          REAL,
    last_chrf          REAL,
    best_bleu          REAL,
    best_bleu_step     INTEGER,
    created_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at         TEXT,
    finished_at        TEXT,
    updated_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX jobs_queue ON jobs (status, priority DESC, id);

CREATE TABLE metrics (
    job_id        INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL,
    epoch         INTEGER NOT NULL,
    loss          REAL,
    lr            REAL,
    loss_scale    REAL,
    found_inf     INTEGER NOT NULL,
    skipped       INTEGER NOT NULL,
    grad_norm     REAL,
    tokens_per_s  REAL,
    step_ms       REAL,
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;

CREATE TABLE validations (
    job_id        INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL,
    epoch         INTEGER NOT NULL,
    val_loss      REAL,
    bleu          REAL,
    chrf          REAL,
    cer           REAL,
    wer           REAL,
    sentences     INTEGER NOT NULL,
    samples_json  TEXT    NOT NULL,
    created_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL,
    epoch         INTEGER NOT NULL,
    path          TEXT    NOT NULL,
    size_bytes    INTEGER NOT NULL,
    sha256        TEXT    NOT NULL,
    val_bleu      REAL,
    is_best       INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (job_id, path)
);

CREATE INDEX checkpoints_job ON checkpoints (job_id, step);

CREATE TABLE corpora (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL UNIQUE,
    src_lang         TEXT    NOT NULL,
    tgt_lang         TEXT    NOT NULL,
    path             TEXT    NOT NULL,
    size_bytes       INTEGER NOT NULL,
    lines            INTEGER NOT NULL,
    malformed_lines  INTEGER NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
