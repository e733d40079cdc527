-- Scale-out (several nodes on one database): the node that owns a running job and until when
-- its lease holds (unix milliseconds, renewed by the owner's heartbeat; another node may claim
-- the job once it has passed), the device kind a job needs (NULL: any), and one row per node.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at BIGINT;
ALTER TABLE jobs ADD COLUMN requires_device TEXT CHECK (requires_device IN ('cpu', 'cuda'));

CREATE INDEX jobs_owner ON jobs (owner);

CREATE TABLE nodes (
    id                 TEXT    PRIMARY KEY,
    host               TEXT    NOT NULL,
    -- JSON array of the node's devices, e.g. ["cpu"] or ["cuda:0", "cuda:1"]
    devices            TEXT    NOT NULL,
    version            TEXT    NOT NULL,
    advertise_url      TEXT,
    started_at         BIGINT NOT NULL,
    last_heartbeat_at  BIGINT NOT NULL
);
