-- Test-set scores of exported models (POST /api/models/{id}/evaluate), kept with the model.

CREATE TABLE model_evaluations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id     INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    corpus       TEXT    NOT NULL,
    sentences    INTEGER NOT NULL,
    beam_size    INTEGER NOT NULL,
    bleu         REAL    NOT NULL,
    chrf         REAL    NOT NULL,
    report_json  TEXT    NOT NULL,
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX model_evaluations_model ON model_evaluations (model_id);
