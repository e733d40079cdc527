-- Overflow forensics (GET /api/jobs/{id}/overflows): per overflowing step, the scale and the
-- first forward activation beyond f16 (when traced); per step and tensor, the non-finite
-- gradient values; on sampled steps, the f16 underflow of the scaled gradients. And the
-- automatic recoveries from a collapsed loss scale (amp.on_scale_collapse).

CREATE TABLE overflow_events (
    job_id          INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step            INTEGER NOT NULL,
    epoch           INTEGER NOT NULL,
    loss_scale      REAL,
    loss_finite     INTEGER NOT NULL,
    activation      TEXT,
    activation_max  REAL,
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;

CREATE TABLE overflow_tensors (
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        INTEGER NOT NULL,
    tensor      TEXT    NOT NULL,
    non_finite  INTEGER NOT NULL,
    numel       INTEGER NOT NULL,
    max_finite  REAL,
    loss_scale  REAL,
    PRIMARY KEY (job_id, step, tensor)
) WITHOUT ROWID;

CREATE TABLE grad_underflow (
    job_id           INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step             INTEGER NOT NULL,
    loss_scale       REAL,
    n_values         INTEGER NOT NULL,
    zero_share       REAL    NOT NULL,
    underflow_share  REAL    NOT NULL,
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;

CREATE TABLE recoveries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id             INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step               INTEGER NOT NULL,
    action             TEXT    NOT NULL CHECK (action IN ('bf16', 'rollback')),
    resumed_from_step  INTEGER NOT NULL,
    precision          TEXT    NOT NULL,
    lr                 REAL    NOT NULL,
    reason             TEXT    NOT NULL,
    created_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX recoveries_job ON recoveries (job_id, id);
