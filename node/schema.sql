-- The node's whole persistent state (schema version 2).  Applied by node/database.py when
-- PRAGMA user_version is below that; every statement is IF NOT EXISTS, so on a version-1
-- database (no audit_events) it only adds what is new.  Times are REAL epoch seconds (UTC).
--
-- Files live under the spool directory at the relative_path columns; a row is
-- written only after its file is durable, so every row points at a complete file.

CREATE TABLE IF NOT EXISTS clinical_records (
    id                  INTEGER PRIMARY KEY,
    record_json         TEXT NOT NULL CHECK (json_valid(record_json)),
    -- match keys: by accession number when both sides have one,
    -- otherwise by patient ID + study instance UID.
    accession_number    TEXT,
    patient_id          TEXT,
    study_instance_uid  TEXT,
    received_at         REAL NOT NULL,
    CHECK (accession_number IS NOT NULL OR (patient_id IS NOT NULL AND study_instance_uid IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS clinical_records_by_accession ON clinical_records (accession_number);
CREATE INDEX IF NOT EXISTS clinical_records_by_study ON clinical_records (study_instance_uid, patient_id);

CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid  TEXT PRIMARY KEY,
    state               TEXT NOT NULL CHECK (state IN (
                            'receiving', 'waiting_for_clinical', 'ready', 'scoring',
                            'scored', 'delivered', 'failed', 'expired')),
    accession_number    TEXT,
    patient_id          TEXT,
    created_at          REAL NOT NULL,
    last_instance_at    REAL NOT NULL,
    state_changed_at    REAL NOT NULL,
    -- set on entering failed/expired, cleared on leaving them
    failure_reason      TEXT,
    clinical_record_id  INTEGER REFERENCES clinical_records (id),
    -- the scoring lease: set by 'claimed', cleared when scoring ends
    claimed_by          TEXT,
    lease_until         REAL,
    claim_attempts      INTEGER NOT NULL DEFAULT 0,
    -- files removed by retention; the row and its history stay
    purged_at           REAL,
    CHECK ((state = 'scoring') = (claimed_by IS NOT NULL AND lease_until IS NOT NULL)),
    CHECK ((state IN ('failed', 'expired')) = (failure_reason IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, state_changed_at);
CREATE INDEX IF NOT EXISTS studies_by_accession ON studies (accession_number);

CREATE TABLE IF NOT EXISTS study_events (
    id                  INTEGER PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid),
    from_state          TEXT,          -- NULL: the study was created by this event
    to_state            TEXT NOT NULL,
    event               TEXT NOT NULL,
    reason              TEXT,
    at                  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS study_events_by_study ON study_events (study_instance_uid, id);

CREATE TABLE IF NOT EXISTS instances (
    -- UNIQUE SOP Instance UID: a re-sent instance is recognised, never stored twice.
    sop_instance_uid            TEXT PRIMARY KEY,
    -- checked at commit: the instance row is written before its study row may be created
    study_instance_uid          TEXT NOT NULL REFERENCES studies (study_instance_uid) DEFERRABLE INITIALLY DEFERRED,
    series_instance_uid         TEXT NOT NULL,
    sop_class_uid               TEXT NOT NULL,
    modality                    TEXT NOT NULL,
    frame_of_reference_uid      TEXT,
    -- for a SEG: JSON arrays of the CT series / instances it was drawn on
    referenced_series_json      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(referenced_series_json)),
    referenced_instances_json   TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(referenced_instances_json)),
    relative_path               TEXT NOT NULL UNIQUE,
    size_bytes                  INTEGER NOT NULL,
    sha256                      TEXT NOT NULL,
    stored_at                   REAL NOT NULL,
    purged_at                   REAL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid, series_instance_uid);

CREATE TABLE IF NOT EXISTS sr_documents (
    -- deterministic UID from the scoring inputs; UNIQUE so one SR is created once
    sr_sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid),
    relative_path       TEXT NOT NULL UNIQUE,
    size_bytes          INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    created_at          REAL NOT NULL,
    purged_at           REAL
);
CREATE INDEX IF NOT EXISTS sr_documents_by_study ON sr_documents (study_instance_uid);

CREATE TABLE IF NOT EXISTS outbox (
    id                  INTEGER PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid),
    sr_sop_instance_uid TEXT NOT NULL REFERENCES sr_documents (sr_sop_instance_uid),
    destination         TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    -- a sender's hold on a 'sending' row; once past, the row is due again
    sending_until       REAL,
    last_error          TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    UNIQUE (sr_sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_by_study ON outbox (study_instance_uid);

-- Append-only audit trail (IHE ATNA / DICOM PS3.15 A.5 style): who sent what, what was
-- sent where.  Written in the same transaction as the action it records, so an event
-- exists exactly when its action committed, kill -9 or not.  No PHI beyond the Study
-- Instance UID: "who" is an AE title and IP, a destination name or a local user;
-- "what" is the study UID and counts.  Added in schema version 2.
CREATE TABLE IF NOT EXISTS audit_events (
    id                  INTEGER PRIMARY KEY,
    at                  REAL NOT NULL,
    event               TEXT NOT NULL,   -- node.audit.AuditEventType
    atna_event_id       TEXT NOT NULL,   -- e.g. 'DCM 110104' (DICOM Instances Transferred)
    action              TEXT NOT NULL CHECK (action IN ('C', 'R', 'U', 'D', 'E')),
    outcome             INTEGER NOT NULL CHECK (outcome IN (0, 4, 8, 12)),
    who                 TEXT NOT NULL,   -- the active participant that caused it
    destination         TEXT,            -- where something was sent, if anything
    study_instance_uid  TEXT,
    counts_json         TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(counts_json))
);
CREATE INDEX IF NOT EXISTS audit_events_by_time ON audit_events (at);
CREATE INDEX IF NOT EXISTS audit_events_by_study ON audit_events (study_instance_uid, id);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;

PRAGMA user_version = 2;
