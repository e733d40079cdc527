-- Forks (POST /api/jobs/{id}/fork) and precision experiments (POST /api/experiments).
-- A fork starts from a checkpoint of its parent: `parent_job_id` and `parent_checkpoint` (the
-- step) say which; `seed_dir` holds the copied checkpoint until the job's first run moves it
-- into its run directory.
ALTER TABLE jobs ADD COLUMN parent_job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL;
ALTER TABLE jobs ADD COLUMN parent_checkpoint INTEGER;
ALTER TABLE jobs ADD COLUMN seed_dir TEXT;

-- An experiment: one spec, several arms (spec overrides with a label), one budget; each arm is
-- a job.
CREATE TABLE experiments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    spec_json   TEXT    NOT NULL,
    -- {"max_steps", "max_time_s", "noise_bleu", "memory_estimates": [bytes per arm]}
    settings_json TEXT  NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE experiment_arms (
    experiment_id  INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    position       INTEGER NOT NULL,
    label          TEXT    NOT NULL,
    overrides_json TEXT    NOT NULL,
    job_id         INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    PRIMARY KEY (experiment_id, position)
);
