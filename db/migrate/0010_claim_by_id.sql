-- tasker_core schema, version 10: the claim updates the steps it chose by
-- id. Version 9 fed the chosen ids to the UPDATE through a CTE whose row
-- count the planner cannot know (its LIMIT is computed), so it guessed a
-- tenth of the ready steps and joined them by hashing the whole steps table:
-- every claim read every step row, finished ones included (about 10 ms for
-- 50 steps with 10,000 ready). The ids now go through an array, whose size
-- the planner sees: each chosen step is updated through the primary key.
-- Same arguments, result and behaviour.

CREATE OR REPLACE FUNCTION tasker_claim(p_owner text, p_limit int, p_lease_ms int, p_state text, p_suspect_lost int,
                             p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_ids bigint[];
BEGIN
  IF p_state NOT IN ('enqueued', 'in_progress') THEN
    RAISE EXCEPTION 'tasker_claim: a claim moves steps to enqueued or in_progress, not %', p_state;
  END IF;
  v_ids := ARRAY(
  WITH suspect AS (
    SELECT s.id FROM tasker_workflow_steps s
      JOIN tasker_tasks t ON t.id = s.task_id
     WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.next_attempt_at <= now()
       AND s.lost_attempts >= p_suspect_lost AND t.state IN ('pending', 'in_progress')
     ORDER BY s.next_attempt_at, s.id
     LIMIT greatest(least(coalesce(p_suspect_limit, 0), p_limit), 0)
     FOR UPDATE OF s SKIP LOCKED
  ), plain AS (
    SELECT s.id FROM tasker_workflow_steps s
      JOIN tasker_tasks t ON t.id = s.task_id
     WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.next_attempt_at <= now()
       AND (p_suspect_lost IS NULL OR s.lost_attempts < p_suspect_lost) AND t.state IN ('pending', 'in_progress')
     ORDER BY s.next_attempt_at, s.id
     LIMIT greatest(p_limit - (SELECT count(*) FROM suspect), 0)
     FOR UPDATE OF s SKIP LOCKED
  )
  SELECT id FROM suspect UNION ALL SELECT id FROM plain);
  IF cardinality(v_ids) = 0 THEN
    RETURN;
  END IF;
  RETURN QUERY
  WITH claimed AS (
    UPDATE tasker_workflow_steps s
       SET state = p_state, attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
     WHERE s.id = ANY(v_ids)
    RETURNING s.id, s.task_id, s.name, s.handler, s.handler_config, s.attempts, s.timeout_ms, s.lost_attempts
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
    SELECT c.id, c.task_id, 'pending', p_state, c.attempts, p_owner, 'claimed' FROM claimed c
  ), started AS (
    UPDATE tasker_tasks t SET state = 'in_progress', updated_at = now()
     WHERE t.id IN (SELECT c.task_id FROM claimed c) AND t.state = 'pending'
    RETURNING t.id
  ), started_logged AS (
    INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
    SELECT started.id, 'pending', 'in_progress', 'claimed' FROM started
  )
  SELECT c.id, c.task_id, c.name, c.handler, c.handler_config, c.attempts, c.timeout_ms, t.context,
         coalesce(d.names, '{}'::text[]), coalesce(d.outputs, '{}'::bytea[]), c.lost_attempts
    FROM claimed c
    JOIN tasker_tasks t ON t.id = c.task_id
    LEFT JOIN LATERAL (
      SELECT array_agg(p.name ORDER BY p.name) AS names, array_agg(p.output ORDER BY p.name) AS outputs
        FROM tasker_workflow_step_edges e
        JOIN tasker_workflow_steps p ON p.id = e.from_step_id
       WHERE e.to_step_id = c.id
    ) d ON true
   ORDER BY c.id;
END $$;
