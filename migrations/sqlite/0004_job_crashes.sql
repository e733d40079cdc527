-- Runner crashes since the job was last queued by a user: the training process died (signal,
-- abort, non-zero exit) or the server stopped without a graceful shutdown while it ran. At
-- `--max-attempts` the job is failed instead of re-queued.
ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
