"""The reference-score cache: written by score-ref, read by train, eval and plan.

fingerprint (what changes a score, its digest, what differs), manifest (the finished cache's record, by named
accessors), reader (open_cache: parts, rows, one split read on demand), rows (a row's values by name), writer
(the folder, parts, resume and manifest on disk), scoring (score-ref's work: the reference scores every pair).
The column names are core.schemas' (SCORES_SCHEMA and its *_COLUMN(S) constants).
"""
