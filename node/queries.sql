-- Every SQL statement the node runs, by name.  node/database.py parses this file:
-- a block starts at "-- name: <name>" and runs to the next one.  Parameters are
-- :named.  Lists of states are passed as JSON arrays (json_each) so the state
-- vocabulary lives only in node/states.py.

-- name: study_by_uid
SELECT s.*,
       (SELECT count(*) FROM instances i
         WHERE i.study_instance_uid = s.study_instance_uid AND i.purged_at IS NULL) AS instance_count
  FROM studies s
 WHERE s.study_instance_uid = :study_uid;

-- name: list_studies
SELECT s.*,
       (SELECT count(*) FROM instances i
         WHERE i.study_instance_uid = s.study_instance_uid AND i.purged_at IS NULL) AS instance_count
  FROM studies s
 WHERE :states IS NULL OR s.state IN (SELECT value FROM json_each(:states))
 ORDER BY s.created_at DESC, s.study_instance_uid
 LIMIT :limit;

-- name: counts_by_state
SELECT state, count(*) AS n FROM studies GROUP BY state;

-- name: studies_in_states_oldest_first
SELECT study_instance_uid
  FROM studies
 WHERE state IN (SELECT value FROM json_each(:states))
 ORDER BY state_changed_at, study_instance_uid
 LIMIT :limit;

-- name: stale_leases
SELECT study_instance_uid, claimed_by, lease_until, claim_attempts
  FROM studies
 WHERE state = 'scoring' AND lease_until <= :now
 ORDER BY lease_until;

-- name: scoring_claims
SELECT study_instance_uid, claimed_by, lease_until, claim_attempts
  FROM studies
 WHERE state = 'scoring'
 ORDER BY lease_until;

-- name: release_delivery_holds
-- At start-up, under the service lock: a 'sending' hold belongs to an instance that is gone.
UPDATE outbox SET sending_until = :now, updated_at = :now
 WHERE state = 'sending' AND sending_until > :now;

-- name: studies_due_for_cleanup
SELECT s.*, 0 AS instance_count
  FROM studies s
 WHERE s.state IN (SELECT value FROM json_each(:states))
   AND s.purged_at IS NULL
   AND s.state_changed_at <= :changed_before
   -- a scored study is finished only when nothing is left to send (a node with no destinations)
   AND (s.state != 'scored'
        OR NOT EXISTS (SELECT 1 FROM outbox o
                        WHERE o.study_instance_uid = s.study_instance_uid
                          AND o.state IN ('pending', 'sending', 'failed')))
 ORDER BY s.state_changed_at;

-- name: create_study
INSERT INTO studies (study_instance_uid, state, accession_number, patient_id,
                     created_at, last_instance_at, state_changed_at)
VALUES (:study_uid, 'receiving', :accession_number, :patient_id, :now, :now, :now)
ON CONFLICT (study_instance_uid) DO NOTHING;

-- name: touch_study_for_instance
-- The first non-empty accession number / patient ID wins; they only serve matching.
UPDATE studies
   SET last_instance_at = max(last_instance_at, :now),
       accession_number = coalesce(accession_number, :accession_number),
       patient_id = coalesce(patient_id, :patient_id)
 WHERE study_instance_uid = :study_uid;

-- name: advance_study
-- The compare-and-set at the heart of node/study_machine.py: it changes the row
-- only if the study is still in the state the caller observed and every guard
-- holds; rowcount 0 means the transition did not happen.
UPDATE studies
   SET state = :to_state,
       state_changed_at = :now,
       failure_reason = :failure_reason,
       claimed_by = :claimed_by,
       lease_until = :lease_until,
       claim_attempts = CASE WHEN :reset_claim_attempts THEN 0 ELSE claim_attempts + :claim_increment END,
       purged_at = CASE WHEN :clears_purge THEN NULL ELSE purged_at END
 WHERE study_instance_uid = :study_uid
   AND state IN (SELECT value FROM json_each(:from_states))
   AND (:required_claimant IS NULL OR claimed_by = :required_claimant)
   AND (:lease_expired_by IS NULL OR lease_until <= :lease_expired_by)
   AND (NOT :requires_files OR purged_at IS NULL)
   AND (NOT :requires_sr OR EXISTS (SELECT 1 FROM sr_documents d
                                     WHERE d.study_instance_uid = studies.study_instance_uid
                                       AND d.purged_at IS NULL));

-- name: insert_study_event
INSERT INTO study_events (study_instance_uid, from_state, to_state, event, reason, at)
VALUES (:study_uid, :from_state, :to_state, :event, :reason, :now);

-- name: study_events
SELECT * FROM study_events WHERE study_instance_uid = :study_uid ORDER BY id;

-- name: renew_lease
UPDATE studies
   SET lease_until = :lease_until
 WHERE study_instance_uid = :study_uid AND state = 'scoring' AND claimed_by = :worker_id;

-- name: mark_study_purged
UPDATE studies
   SET purged_at = :now
 WHERE study_instance_uid = :study_uid
   AND (state IN (SELECT value FROM json_each(:states))
        -- scored with nothing left to send: a node without destinations
        OR (state = 'scored'
            AND NOT EXISTS (SELECT 1 FROM outbox o
                             WHERE o.study_instance_uid = studies.study_instance_uid
                               AND o.state IN ('pending', 'sending', 'failed'))))
   AND purged_at IS NULL;

-- name: link_clinical_record
UPDATE studies
   SET clinical_record_id = :record_id
 WHERE study_instance_uid = :study_uid
   AND (clinical_record_id IS NULL OR clinical_record_id < :record_id)
   AND state IN (SELECT value FROM json_each(:states));

-- name: instance_by_sop
SELECT * FROM instances WHERE sop_instance_uid = :sop_uid;

-- name: upsert_instance
-- A new SOP Instance UID is inserted; a known one is only rewritten if its
-- file was purged by retention (a PACS re-sending an old study).
INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid,
                       modality, frame_of_reference_uid, referenced_series_json,
                       referenced_instances_json, relative_path, size_bytes, sha256, stored_at)
VALUES (:sop_uid, :study_uid, :series_uid, :sop_class_uid, :modality, :frame_of_reference_uid,
        :referenced_series_json, :referenced_instances_json, :relative_path, :size_bytes, :sha256, :now)
ON CONFLICT (sop_instance_uid) DO UPDATE
   SET study_instance_uid = excluded.study_instance_uid,
       series_instance_uid = excluded.series_instance_uid,
       sop_class_uid = excluded.sop_class_uid,
       modality = excluded.modality,
       frame_of_reference_uid = excluded.frame_of_reference_uid,
       referenced_series_json = excluded.referenced_series_json,
       referenced_instances_json = excluded.referenced_instances_json,
       relative_path = excluded.relative_path,
       size_bytes = excluded.size_bytes,
       sha256 = excluded.sha256,
       stored_at = excluded.stored_at,
       purged_at = NULL
 WHERE instances.purged_at IS NOT NULL;

-- name: study_instances
SELECT * FROM instances
 WHERE study_instance_uid = :study_uid AND (:include_purged OR purged_at IS NULL)
 ORDER BY series_instance_uid, stored_at, sop_instance_uid;

-- name: all_instance_files
SELECT sop_instance_uid, relative_path, purged_at FROM instances;

-- name: mark_instances_purged
UPDATE instances SET purged_at = :now
 WHERE study_instance_uid = :study_uid AND purged_at IS NULL;

-- name: clinical_records_of_study
-- Every record that is or was this study's: the linked one, and the records its keys match
-- (superseded corrections).  Used when retention forgets the study's patient data.
SELECT r.id FROM clinical_records r, studies s
 WHERE s.study_instance_uid = :study_uid
   AND (r.id = s.clinical_record_id
        OR r.study_instance_uid = s.study_instance_uid
        OR (s.accession_number IS NOT NULL AND r.accession_number = s.accession_number));

-- name: forget_study_identifiers
UPDATE studies SET patient_id = NULL, accession_number = NULL, clinical_record_id = NULL
 WHERE study_instance_uid = :study_uid;

-- name: delete_unlinked_clinical_records
-- Only records no study points at any more (another study may share an accession number).
DELETE FROM clinical_records
 WHERE id IN (SELECT value FROM json_each(:ids))
   AND id NOT IN (SELECT clinical_record_id FROM studies WHERE clinical_record_id IS NOT NULL);

-- name: expire_unmatched_clinical_records
DELETE FROM clinical_records
 WHERE received_at <= :received_before
   AND id NOT IN (SELECT clinical_record_id FROM studies WHERE clinical_record_id IS NOT NULL);

-- name: insert_clinical_record
INSERT INTO clinical_records (record_json, accession_number, patient_id, study_instance_uid, received_at)
VALUES (:record_json, :accession_number, :patient_id, :study_uid, :now);

-- name: clinical_record_by_id
SELECT * FROM clinical_records WHERE id = :record_id;

-- name: newest_clinical_record_for_study
-- Match by accession number when both sides have one; otherwise by patient ID
-- and study instance UID together.  Newest record wins (a correction).
-- A record that names a Study Instance UID never matches another study, even by
-- accession number: scoring would refuse that pair anyway.
SELECT id FROM clinical_records r
 WHERE (r.study_instance_uid IS NULL OR r.study_instance_uid = :study_uid)
   AND ((r.accession_number IS NOT NULL AND :accession_number IS NOT NULL
         AND r.accession_number = :accession_number)
        OR ((r.accession_number IS NULL OR :accession_number IS NULL)
            AND :patient_id IS NOT NULL AND r.patient_id = :patient_id
            AND r.study_instance_uid = :study_uid))
 ORDER BY r.id DESC
 LIMIT 1;

-- name: studies_matching_clinical_record
SELECT s.study_instance_uid
  FROM studies s
 WHERE (:study_uid IS NULL OR s.study_instance_uid = :study_uid)
   AND ((:accession_number IS NOT NULL AND s.accession_number = :accession_number)
        OR ((:accession_number IS NULL OR s.accession_number IS NULL)
            AND :patient_id IS NOT NULL AND s.patient_id = :patient_id
            AND s.study_instance_uid = :study_uid));

-- name: studies_linked_to_record
SELECT study_instance_uid FROM studies WHERE clinical_record_id = :record_id ORDER BY study_instance_uid;

-- name: sr_by_uid
SELECT * FROM sr_documents WHERE sr_sop_instance_uid = :sr_uid;

-- name: upsert_sr_document
-- First SR wins: a known live SR UID is never rewritten; a purged one may be.
INSERT INTO sr_documents (sr_sop_instance_uid, study_instance_uid, relative_path, size_bytes, sha256, created_at)
VALUES (:sr_uid, :study_uid, :relative_path, :size_bytes, :sha256, :now)
ON CONFLICT (sr_sop_instance_uid) DO UPDATE
   SET relative_path = excluded.relative_path,
       size_bytes = excluded.size_bytes,
       sha256 = excluded.sha256,
       created_at = excluded.created_at,
       purged_at = NULL
 WHERE sr_documents.purged_at IS NOT NULL AND sr_documents.study_instance_uid = excluded.study_instance_uid;

-- name: study_sr_files
SELECT sr_sop_instance_uid, relative_path FROM sr_documents
 WHERE study_instance_uid = :study_uid AND purged_at IS NULL;

-- name: all_sr_files
SELECT sr_sop_instance_uid, relative_path, purged_at FROM sr_documents;

-- name: mark_srs_purged
UPDATE sr_documents SET purged_at = :now
 WHERE study_instance_uid = :study_uid AND purged_at IS NULL;

-- name: enqueue_delivery
-- Idempotent: a delivery already pending, sending or delivered is left alone;
-- one that gave up is put back to pending (the study is being scored or resent again).
INSERT INTO outbox (study_instance_uid, sr_sop_instance_uid, destination, state, attempts,
                    next_attempt_at, created_at, updated_at)
VALUES (:study_uid, :sr_uid, :destination, 'pending', 0, :now, :now, :now)
ON CONFLICT (sr_sop_instance_uid, destination) DO UPDATE
   SET state = 'pending', attempts = 0, next_attempt_at = :now, sending_until = NULL, updated_at = :now
 WHERE outbox.state = 'failed';

-- name: outbox_item
SELECT o.*, d.relative_path
  FROM outbox o JOIN sr_documents d ON d.sr_sop_instance_uid = o.sr_sop_instance_uid
 WHERE o.id = :item_id;

-- name: due_deliveries
SELECT o.*, d.relative_path
  FROM outbox o JOIN sr_documents d ON d.sr_sop_instance_uid = o.sr_sop_instance_uid
 WHERE (o.state = 'pending' AND o.next_attempt_at <= :now)
    OR (o.state = 'sending' AND o.sending_until <= :now)
 ORDER BY o.next_attempt_at, o.id
 LIMIT :limit;

-- name: study_deliveries
SELECT o.*, d.relative_path
  FROM outbox o JOIN sr_documents d ON d.sr_sop_instance_uid = o.sr_sop_instance_uid
 WHERE o.study_instance_uid = :study_uid
 ORDER BY o.id;

-- name: start_delivery
UPDATE outbox
   SET state = 'sending', sending_until = :sending_until, updated_at = :now
 WHERE id = :item_id
   AND ((state = 'pending' AND next_attempt_at <= :now) OR (state = 'sending' AND sending_until <= :now));

-- name: mark_delivery_delivered
UPDATE outbox
   SET state = 'delivered', delivered_at = :now, sending_until = NULL, updated_at = :now
 WHERE id = :item_id AND state IN ('pending', 'sending');

-- name: mark_delivery_attempt_failed
UPDATE outbox
   SET state = :state, attempts = attempts + 1, next_attempt_at = :next_attempt_at,
       sending_until = NULL, last_error = :error, updated_at = :now
 WHERE id = :item_id AND state IN ('pending', 'sending');

-- name: undelivered_count_for_study
SELECT count(*) AS n FROM outbox WHERE study_instance_uid = :study_uid AND state != 'delivered';

-- name: reset_deliveries_for_resend
UPDATE outbox
   SET state = 'pending', attempts = 0, next_attempt_at = :now, sending_until = NULL, updated_at = :now
 WHERE study_instance_uid = :study_uid
   AND state IN (SELECT value FROM json_each(:states));

-- name: outbox_depth
SELECT count(*) AS n FROM outbox WHERE state != 'delivered';

-- name: insert_audit_event
INSERT INTO audit_events (at, event, atna_event_id, action, outcome, who, destination, study_instance_uid, counts_json)
VALUES (:at, :event, :atna_event_id, :action, :outcome, :who, :destination, :study_uid, :counts_json);

-- name: audit_events
SELECT * FROM audit_events
 WHERE at >= :since AND (:study_uid IS NULL OR study_instance_uid = :study_uid)
 ORDER BY id
 LIMIT :limit;
