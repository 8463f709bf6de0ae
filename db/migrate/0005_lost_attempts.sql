-- tasker_core schema, version 5: lost attempts. A step dispatched again
-- because its worker or its orchestrator was lost, its lease expired or its
-- batch was refused has lost an attempt: it goes back to pending at once
-- without spending its retry budget (failures), and only after more than
-- orchestration.max_lost_attempts such losses does it fail, with
-- TaskerCore::StepLostError, not retryable (docs/protocol.md section 5).
-- An expired claim is such a loss, never a handler failure.

ALTER TABLE tasker_workflow_steps
  ADD COLUMN lost_attempts int NOT NULL DEFAULT 0 CHECK (lost_attempts >= 0);

-- The msgpack error map {"class", "message", "backtrace" => [], "retryable", "retry_after" => nil}
-- the SQL functions write.
CREATE FUNCTION tasker_error(p_class text, p_message text, p_retryable boolean) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
  SELECT '\x85'::bytea
    || tasker_msgpack_str('class') || tasker_msgpack_str(p_class)
    || tasker_msgpack_str('message') || tasker_msgpack_str(p_message)
    || tasker_msgpack_str('backtrace') || '\x90'::bytea
    || tasker_msgpack_str('retryable') || CASE WHEN p_retryable THEN '\xc3'::bytea ELSE '\xc2'::bytea END
    || tasker_msgpack_str('retry_after') || '\xc0'::bytea
$$;

CREATE OR REPLACE FUNCTION tasker_timeout_error(p_message text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
  SELECT tasker_error('TaskerCore::StepTimeoutError', p_message, true)
$$;

-- Each (step, attempt) still enqueued/in_progress at that attempt has lost
-- it: lost_attempts + 1, and
--   up to p_max_lost losses: back to pending now, failures unchanged
--     (transition reason 'lost');
--   more: error with a StepLostError (failures + 1, transition reason
--     'lost_too_often'), its task finalized like any failure.
-- Pairs no longer in flight at that attempt (a result landed, the step was
-- requeued or cancelled) change nothing. Returns how many went back to
-- pending and how many failed.
CREATE FUNCTION tasker_release_lost_steps(p_step_ids bigint[], p_attempts int[], p_max_lost int)
RETURNS TABLE (released int, failed int)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_released int;
  v_failed int;
  v_tasks bigint[];
BEGIN
  WITH target AS (
    SELECT s.id, s.state AS old_state, s.claimed_by AS owner, s.lost_attempts + 1 AS lost,
           s.lost_attempts + 1 > p_max_lost AS too_often
      FROM tasker_workflow_steps s
      JOIN (SELECT DISTINCT u.id, u.attempt FROM unnest(p_step_ids, p_attempts) AS u(id, attempt)) x
        ON s.id = x.id AND s.attempts = x.attempt
     WHERE s.state IN ('enqueued', 'in_progress')
     ORDER BY s.id
       FOR UPDATE OF s
  ), moved AS (
    UPDATE tasker_workflow_steps s
       SET state = CASE WHEN t.too_often THEN 'error' ELSE 'pending' END,
           lost_attempts = t.lost,
           failures = CASE WHEN t.too_often THEN s.failures + 1 ELSE s.failures END,
           last_error = CASE WHEN t.too_often THEN tasker_error(
                          'TaskerCore::StepLostError',
                          format('dispatched %s times without a result: its worker or orchestrator was lost '
                                 'each time', t.lost),
                          false) ELSE s.last_error END,
           last_failure_at = CASE WHEN t.too_often THEN now() ELSE s.last_failure_at END,
           finished_at = CASE WHEN t.too_often THEN now() END,
           next_attempt_at = CASE WHEN t.too_often THEN s.next_attempt_at ELSE now() END,
           claimed_by = NULL, claim_deadline = NULL, updated_at = now()
      FROM target t
     WHERE s.id = t.id
    RETURNING s.id, s.task_id, s.state, s.attempts, t.old_state, t.owner
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
    SELECT m.id, m.task_id, m.old_state, m.state, m.attempts, m.owner,
           CASE WHEN m.state = 'error' THEN 'lost_too_often' ELSE 'lost' END
      FROM moved m
  )
  SELECT count(*) FILTER (WHERE m.state = 'pending'), count(*) FILTER (WHERE m.state = 'error'),
         array_agg(DISTINCT m.task_id) FILTER (WHERE m.state = 'error')
    INTO v_released, v_failed, v_tasks FROM moved m;

  IF v_tasks IS NOT NULL THEN
    PERFORM tasker_finalize_tasks(v_tasks);
  END IF;
  IF v_released > 0 THEN
    PERFORM pg_notify('tasker_steps_ready', '');
  END IF;
  RETURN QUERY SELECT v_released, v_failed;
END $$;

-- Claims of any owner past their claim_deadline (a dead or paused worker or
-- orchestrator): each a lost attempt, through tasker_release_lost_steps.
-- Returns how many steps it moved (back to pending or failed).
CREATE FUNCTION tasker_requeue_expired(p_limit int, p_max_lost int) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
  v_ids bigint[];
  v_attempts int[];
  v_moved int;
BEGIN
  SELECT array_agg(e.id ORDER BY e.id), array_agg(e.attempts ORDER BY e.id) INTO v_ids, v_attempts
    FROM (SELECT s.id, s.attempts FROM tasker_workflow_steps s
           WHERE s.state IN ('enqueued', 'in_progress') AND s.claim_deadline < now()
           ORDER BY s.claim_deadline
           LIMIT p_limit
             FOR UPDATE SKIP LOCKED) e;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  SELECT r.released + r.failed INTO v_moved FROM tasker_release_lost_steps(v_ids, v_attempts, p_max_lost) r;
  RETURN v_moved;
END $$;

-- The version 1 signature, for orchestrators that do not pass
-- max_lost_attempts (a rolling deploy): the same rule with its default, 5.
CREATE OR REPLACE FUNCTION tasker_requeue_expired(p_limit int) RETURNS int
LANGUAGE sql AS $$
  SELECT tasker_requeue_expired(p_limit, 5)
$$;

-- tasker_retry_step as in version 1 (kept under another name), and a
-- retried step starts counting its losses afresh. The step stays locked by
-- the first UPDATE until the caller commits, so no claim comes in between.
ALTER FUNCTION tasker_retry_step(bigint) RENAME TO tasker_retry_failed_step;

CREATE FUNCTION tasker_retry_step(p_step_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  IF NOT tasker_retry_failed_step(p_step_id) THEN
    RETURN false;
  END IF;
  UPDATE tasker_workflow_steps SET lost_attempts = 0 WHERE id = p_step_id;
  RETURN true;
END $$;
