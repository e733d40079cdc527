-- The sha256 of each uploaded corpus, so a node that fetches it from the artifact store checks
-- it got the bytes that were uploaded (NULL for uploads from before).
ALTER TABLE corpora ADD COLUMN sha256 TEXT;
