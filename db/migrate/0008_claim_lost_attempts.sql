-- tasker_core schema, version 8: suspect steps are dispatched alone. A step
-- lost twice or more (its worker died, its lease expired, ...) may be the
-- reason its workers die: the orchestrator sends it in a batch of its own to
-- a worker with nothing in flight (docs/protocol.md section 5), so the steps
-- that happened to share its workers stop being lost with it. The claim
-- returns lost_attempts so the orchestrator can tell, and claims no more
-- suspects than it has idle workers for.

-- Pending steps lost twice or more, in claim order: suspects are rare, and
-- the claim looks for them on every call.
CREATE INDEX tasker_workflow_steps_suspect ON tasker_workflow_steps (next_attempt_at, id)
  WHERE state = 'pending' AND pending_parents = 0 AND lost_attempts >= 2;

-- tasker_claim_steps (version 1) with lost_attempts, and a separate budget
-- for suspects: up to p_suspect_limit ready steps with lost_attempts >=
-- p_suspect_lost (none when p_suspect_lost is NULL), then other ready steps
-- up to p_limit in all. Claiming, logging and starting tasks as in version 1.
CREATE FUNCTION tasker_claim_steps_v2(p_owner text, p_limit int, p_lease_ms int, p_suspect_lost int,
                                      p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
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
  ), ready AS (
    SELECT id FROM suspect UNION ALL SELECT id FROM plain
  ), claimed AS (
    UPDATE tasker_workflow_steps s
       SET state = 'enqueued', attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
      FROM ready WHERE s.id = ready.id
    RETURNING s.id, s.task_id, s.name, s.handler, s.handler_config, s.attempts, s.timeout_ms, s.lost_attempts
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
    SELECT c.id, c.task_id, 'pending', 'enqueued', c.attempts, p_owner, 'claimed' FROM claimed c
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

-- The version 1 signature and its 10 columns, for orchestrators that do
-- not isolate suspects (a rolling deploy) and for TaskerCore::RSpec::Inline:
-- the same claim with no suspect budget, every ready step alike.
CREATE OR REPLACE FUNCTION tasker_claim_steps(p_owner text, p_limit int, p_lease_ms int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[])
LANGUAGE sql AS $$
  SELECT c.step_id, c.task_id, c.step_name, c.handler, c.handler_config, c.attempt, c.timeout_ms, c.context,
         c.dep_names, c.dep_outputs
    FROM tasker_claim_steps_v2(p_owner, p_limit, p_lease_ms, NULL, 0) c
$$;
