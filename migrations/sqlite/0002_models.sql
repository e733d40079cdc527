-- Exported models (f16 model directories) that /api/translate serves.

CREATE TABLE models (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL,
    job_id           INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    step             INTEGER NOT NULL,
    checkpoint       TEXT    NOT NULL,
    path             TEXT    NOT NULL UNIQUE,
    src_lang         TEXT    NOT NULL,
    tgt_lang         TEXT    NOT NULL,
    dtype            TEXT    NOT NULL,
    train_precision  TEXT    NOT NULL,
    val_bleu         REAL,
    params           INTEGER NOT NULL,
    size_bytes       INTEGER NOT NULL,
    manifest_json    TEXT    NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX models_job ON models (job_id);
