-- The PostgreSQL schema: the same tables as migrations/sqlite/0001..0007, in PostgreSQL's
-- types (BIGSERIAL / BIGINT for INTEGER, DOUBLE PRECISION for REAL, BOOLEAN for the 0/1 flags).
-- Timestamps are ISO-8601 UTC strings, like SQLite's, so both engines return the same text.

CREATE TABLE jobs (
    id                 BIGSERIAL PRIMARY KEY,
    name               TEXT    NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')),
    priority           BIGINT  NOT NULL DEFAULT 0,
    spec_json          TEXT    NOT NULL,
    run_dir            TEXT,
    worker             TEXT,
    device             TEXT,
    attempts           BIGINT  NOT NULL DEFAULT 0,
    error              TEXT,
    total_steps        BIGINT,
    current_step       BIGINT  NOT NULL DEFAULT 0,
    resumed_from_step  BIGINT  NOT NULL DEFAULT 0,
    current_epoch      BIGINT  NOT NULL DEFAULT 0,
    current_loss       DOUBLE PRECISION,
    current_lr         DOUBLE PRECISION,
    loss_scale         DOUBLE PRECISION,
    skipped_steps      BIGINT  NOT NULL DEFAULT 0,
    tokens_per_s       DOUBLE PRECISION,
    step_ms            DOUBLE PRECISION,
    last_val_loss      DOUBLE PRECISION,
    last_bleu          DOUBLE PRECISION,
    last_chrf          DOUBLE PRECISION,
    best_bleu          DOUBLE PRECISION,
    best_bleu_step     BIGINT,
    created_at         TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')),
    started_at         TEXT,
    finished_at        TEXT,
    updated_at         TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')),
    crashes            BIGINT  NOT NULL DEFAULT 0,
    parent_job_id      BIGINT  REFERENCES jobs (id) ON DELETE SET NULL,
    parent_checkpoint  BIGINT,
    seed_dir           TEXT
);

CREATE INDEX jobs_queue ON jobs (status, priority DESC, id);

CREATE TABLE metrics (
    job_id        BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          BIGINT  NOT NULL,
    epoch         BIGINT  NOT NULL,
    loss          DOUBLE PRECISION,
    lr            DOUBLE PRECISION,
    loss_scale    DOUBLE PRECISION,
    found_inf     BOOLEAN NOT NULL,
    skipped       BOOLEAN NOT NULL,
    grad_norm     DOUBLE PRECISION,
    tokens_per_s  DOUBLE PRECISION,
    step_ms       DOUBLE PRECISION,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE validations (
    job_id        BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          BIGINT  NOT NULL,
    epoch         BIGINT  NOT NULL,
    val_loss      DOUBLE PRECISION,
    bleu          DOUBLE PRECISION,
    chrf          DOUBLE PRECISION,
    cer           DOUBLE PRECISION,
    wer           DOUBLE PRECISION,
    sentences     BIGINT  NOT NULL,
    samples_json  TEXT    NOT NULL,
    created_at    TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')),
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    id            BIGSERIAL PRIMARY KEY,
    job_id        BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          BIGINT  NOT NULL,
    epoch         BIGINT  NOT NULL,
    path          TEXT    NOT NULL,
    size_bytes    BIGINT  NOT NULL,
    sha256        TEXT    NOT NULL,
    val_bleu      DOUBLE PRECISION,
    is_best       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')),
    UNIQUE (job_id, path)
);

CREATE INDEX checkpoints_job ON checkpoints (job_id, step);

CREATE TABLE corpora (
    id               BIGSERIAL PRIMARY KEY,
    name             TEXT    NOT NULL UNIQUE,
    src_lang         TEXT    NOT NULL,
    tgt_lang         TEXT    NOT NULL,
    path             TEXT    NOT NULL,
    size_bytes       BIGINT  NOT NULL,
    lines            BIGINT  NOT NULL,
    malformed_lines  BIGINT  NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);

CREATE TABLE models (
    id               BIGSERIAL PRIMARY KEY,
    name             TEXT    NOT NULL,
    job_id           BIGINT  REFERENCES jobs (id) ON DELETE SET NULL,
    step             BIGINT  NOT NULL,
    checkpoint       TEXT    NOT NULL,
    path             TEXT    NOT NULL UNIQUE,
    src_lang         TEXT    NOT NULL,
    tgt_lang         TEXT    NOT NULL,
    dtype            TEXT    NOT NULL,
    train_precision  TEXT    NOT NULL,
    val_bleu         DOUBLE PRECISION,
    params           BIGINT  NOT NULL,
    size_bytes       BIGINT  NOT NULL,
    manifest_json    TEXT    NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);

CREATE INDEX models_job ON models (job_id);

CREATE TABLE model_evaluations (
    id           BIGSERIAL PRIMARY KEY,
    model_id     BIGINT  NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    corpus       TEXT    NOT NULL,
    sentences    BIGINT  NOT NULL,
    beam_size    BIGINT  NOT NULL,
    bleu         DOUBLE PRECISION NOT NULL,
    chrf         DOUBLE PRECISION NOT NULL,
    report_json  TEXT    NOT NULL,
    created_at   TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);

CREATE INDEX model_evaluations_model ON model_evaluations (model_id);

CREATE TABLE experiments (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT    NOT NULL,
    spec_json     TEXT    NOT NULL,
    settings_json TEXT    NOT NULL,
    created_at    TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);

CREATE TABLE experiment_arms (
    experiment_id  BIGINT  NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    position       BIGINT  NOT NULL,
    label          TEXT    NOT NULL,
    overrides_json TEXT    NOT NULL,
    job_id         BIGINT  REFERENCES jobs (id) ON DELETE SET NULL,
    PRIMARY KEY (experiment_id, position)
);

CREATE TABLE overflow_events (
    job_id          BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step            BIGINT  NOT NULL,
    epoch           BIGINT  NOT NULL,
    loss_scale      DOUBLE PRECISION,
    loss_finite     BOOLEAN NOT NULL,
    activation      TEXT,
    activation_max  DOUBLE PRECISION,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE overflow_tensors (
    job_id      BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        BIGINT  NOT NULL,
    tensor      TEXT    NOT NULL,
    non_finite  BIGINT  NOT NULL,
    numel       BIGINT  NOT NULL,
    max_finite  DOUBLE PRECISION,
    loss_scale  DOUBLE PRECISION,
    PRIMARY KEY (job_id, step, tensor)
);

CREATE TABLE grad_underflow (
    job_id           BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step             BIGINT  NOT NULL,
    loss_scale       DOUBLE PRECISION,
    n_values         BIGINT  NOT NULL,
    zero_share       DOUBLE PRECISION NOT NULL,
    underflow_share  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE recoveries (
    id                 BIGSERIAL PRIMARY KEY,
    job_id             BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step               BIGINT  NOT NULL,
    action             TEXT    NOT NULL CHECK (action IN ('bf16', 'rollback')),
    resumed_from_step  BIGINT  NOT NULL,
    precision          TEXT    NOT NULL,
    lr                 DOUBLE PRECISION NOT NULL,
    reason             TEXT    NOT NULL,
    created_at         TEXT    NOT NULL DEFAULT (to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
);

CREATE INDEX recoveries_job ON recoveries (job_id, id);
