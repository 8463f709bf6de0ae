-- tasker_core schema, version 9: tasks created in bulk, and a claim that
-- moves steps straight to in_progress.
--
-- tasker_create_tasks creates many tasks of one template in one statement
-- per table (TaskerCore.create_tasks); tasker_create_task is now that
-- function called with one task, so both follow one rule.
--
-- tasker_claim_steps_v3 claims ready steps straight to in_progress, with
-- version 8's suspect budget and lost_attempts: the separate
-- tasker_mark_dispatched call (one more non-HOT update, one more transition
-- row and one more commit per batch) goes away for orchestrators that use
-- it. A claimed step the orchestrator could not send is released
-- (tasker_release_steps) as before; a result applies to in_progress steps
-- as before. tasker_claim_steps and tasker_claim_steps_v2 (to enqueued) and
-- tasker_mark_dispatched stay for older orchestrators; all three claims are
-- one function, tasker_claim.

-- pending -> in_progress is legal (the direct claim); the rest as in version 1.
DROP TRIGGER tasker_workflow_steps_state_guard ON tasker_workflow_steps;
CREATE TRIGGER tasker_workflow_steps_state_guard
  BEFORE UPDATE OF state ON tasker_workflow_steps
  FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT (
    (OLD.state = 'pending'     AND NEW.state IN ('enqueued', 'in_progress', 'cancelled', 'resolved_manually')) OR
    (OLD.state = 'enqueued'    AND NEW.state IN ('in_progress', 'pending', 'complete', 'error',
                                                 'cancelled', 'resolved_manually')) OR
    (OLD.state = 'in_progress' AND NEW.state IN ('pending', 'complete', 'error', 'cancelled',
                                                 'resolved_manually')) OR
    (OLD.state = 'error'       AND NEW.state IN ('pending', 'cancelled', 'resolved_manually'))))
  EXECUTE FUNCTION tasker_refuse_step_transition();

-- ---------------------------------------------------------------------------
-- Creating tasks.

-- The id of the template as given: the stored row when its definition is the
-- same (one read, no write), else stored or updated now.
CREATE FUNCTION tasker_template_id(p_namespace text, p_name text, p_version text, p_definition jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_template bigint;
BEGIN
  SELECT id INTO v_template FROM tasker_task_templates
   WHERE namespace = p_namespace AND name = p_name AND version = p_version AND definition = p_definition;
  IF v_template IS NULL THEN
    INSERT INTO tasker_task_templates (namespace, name, version, definition)
    VALUES (p_namespace, p_name, p_version, p_definition)
    ON CONFLICT (namespace, name, version)
      DO UPDATE SET definition = EXCLUDED.definition, updated_at = now()
      WHERE tasker_task_templates.definition IS DISTINCT FROM EXCLUDED.definition
    RETURNING id INTO v_template;
    IF v_template IS NULL THEN
      SELECT id INTO v_template FROM tasker_task_templates
       WHERE namespace = p_namespace AND name = p_name AND version = p_version;
    END IF;
  END IF;
  RETURN v_template;
END $$;

-- Tasks of one template, one per element of p_contexts (p_identity_keys
-- parallel, NULL for none). The step arrays are parallel, one element per
-- step of the template; edges name steps by name. Returns one row per task
-- in the order given: its id and whether it was created (false: a task with
-- its identity_key existed already, or came earlier in the same call).
-- Tasks are inserted in identity_key order, so two calls with overlapping
-- keys wait for each other instead of deadlocking; ids are drawn in the
-- order given. No statement here scans a table (inserts from arrays, unique
-- index lookups), so plans are cached (no force_custom_plan): planning was
-- a third of the cost of a one-task call.
CREATE FUNCTION tasker_create_tasks(
  p_namespace text, p_name text, p_version text, p_definition jsonb, p_contexts bytea[], p_identity_keys text[],
  p_step_names text[], p_handlers text[], p_handler_configs bytea[], p_timeouts_ms int[],
  p_retryable boolean[], p_max_attempts int[], p_backoff_base_ms int[], p_backoff_cap_ms int[],
  p_jitter float8[], p_edge_from text[], p_edge_to text[])
RETURNS TABLE (task_id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_n int := coalesce(cardinality(p_contexts), 0);
  v_template bigint;
  v_ids bigint[];
  v_new bigint[];
BEGIN
  IF v_n = 0 THEN
    RETURN;
  END IF;
  v_template := tasker_template_id(p_namespace, p_name, p_version, p_definition);
  v_ids := ARRAY(SELECT nextval('tasker_tasks_id_seq'::regclass) FROM generate_series(1, v_n));

  WITH ins AS (
    INSERT INTO tasker_tasks (id, template_id, namespace, name, version, context, identity_key,
                              step_count, remaining_steps)
    SELECT v_ids[x.ord], v_template, p_namespace, p_name, p_version, x.context, x.identity_key,
           cardinality(p_step_names), cardinality(p_step_names)
      FROM unnest(p_contexts, p_identity_keys) WITH ORDINALITY AS x(context, identity_key, ord)
     WHERE x.ord <= v_n
     ORDER BY x.identity_key, x.ord
    ON CONFLICT (identity_key) DO NOTHING
    RETURNING id
  )
  SELECT array_agg(ins.id ORDER BY ins.id) INTO v_new FROM ins;

  IF v_new IS NOT NULL THEN
    -- Steps and edges of every new task in one statement, from the rows the
    -- steps INSERT returns. A step's history starts at its first claim (its
    -- created_at says when it was created; the task logs its creation).
    WITH steps AS (
      INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, pending_parents, retryable,
                                         max_attempts, backoff_base_ms, backoff_cap_ms, jitter, timeout_ms)
      SELECT t.id, x.name, x.handler, x.config, coalesce(p.n, 0),
             x.retryable, x.max_attempts, x.base, x.cap, x.jitter, x.timeout
        FROM unnest(v_new) AS t(id)
       CROSS JOIN unnest(p_step_names, p_handlers, p_handler_configs, p_timeouts_ms, p_retryable, p_max_attempts,
                         p_backoff_base_ms, p_backoff_cap_ms, p_jitter)
             WITH ORDINALITY AS x(name, handler, config, timeout, retryable, max_attempts, base, cap, jitter, ord)
        LEFT JOIN (SELECT e.to_name, count(*)::int AS n FROM unnest(p_edge_to) AS e(to_name) GROUP BY e.to_name) p
          ON p.to_name = x.name
       ORDER BY t.id, x.ord  -- ids in task, then template order
      RETURNING id, task_id, name
    )
    INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id)
    SELECT f.id, t.id
      FROM unnest(p_edge_from, p_edge_to) AS e(from_name, to_name)
      JOIN steps f ON f.name = e.from_name
      JOIN steps t ON t.task_id = f.task_id AND t.name = e.to_name;

    INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
    SELECT t.id, NULL, 'pending', 'created' FROM unnest(v_new) AS t(id);

    PERFORM pg_notify('tasker_steps_ready', '');
  END IF;

  -- A task not created: the existing one (a concurrent insert has committed:
  -- ON CONFLICT waited for it; an earlier one in this call is visible here).
  RETURN QUERY
  SELECT CASE WHEN n.id IS NOT NULL THEN n.id
              ELSE (SELECT t.id FROM tasker_tasks t WHERE t.identity_key = x.identity_key) END,
         n.id IS NOT NULL
    FROM unnest(p_contexts, p_identity_keys) WITH ORDINALITY AS x(context, identity_key, ord)
    LEFT JOIN unnest(v_new) AS n(id) ON n.id = v_ids[x.ord]
   WHERE x.ord <= v_n
   ORDER BY x.ord;
END $$;

-- One task: tasker_create_tasks with one element.
CREATE OR REPLACE FUNCTION tasker_create_task(
  p_namespace text, p_name text, p_version text, p_definition jsonb, p_context bytea, p_identity_key text,
  p_step_names text[], p_handlers text[], p_handler_configs bytea[], p_timeouts_ms int[],
  p_retryable boolean[], p_max_attempts int[], p_backoff_base_ms int[], p_backoff_cap_ms int[],
  p_jitter float8[], p_edge_from text[], p_edge_to text[])
RETURNS TABLE (task_id bigint, created boolean) LANGUAGE sql AS $$
  SELECT c.task_id, c.created
    FROM tasker_create_tasks(p_namespace, p_name, p_version, p_definition, ARRAY[p_context], ARRAY[p_identity_key],
                             p_step_names, p_handlers, p_handler_configs, p_timeouts_ms, p_retryable, p_max_attempts,
                             p_backoff_base_ms, p_backoff_cap_ms, p_jitter, p_edge_from, p_edge_to) c
$$;

-- ---------------------------------------------------------------------------
-- Claiming.

-- Ready steps claimed to p_state ('enqueued': tasker_claim_steps and
-- tasker_claim_steps_v2, then tasker_mark_dispatched; 'in_progress':
-- tasker_claim_steps_v3, no second call), with version 8's suspect budget:
-- up to p_suspect_limit ready steps with lost_attempts >= p_suspect_lost
-- (none when p_suspect_lost is NULL), then other ready steps up to p_limit
-- in all. One statement: lock the ready steps, claim them, log one
-- transition each (reason 'claimed'), start their pending tasks, and return
-- them with their context, parents' outputs and lost_attempts.
CREATE FUNCTION tasker_claim(p_owner text, p_limit int, p_lease_ms int, p_state text, p_suspect_lost int,
                             p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
BEGIN
  IF p_state NOT IN ('enqueued', 'in_progress') THEN
    RAISE EXCEPTION 'tasker_claim: a claim moves steps to enqueued or in_progress, not %', p_state;
  END IF;
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
       SET state = p_state, attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
      FROM ready WHERE s.id = ready.id
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

-- Version 1 (orchestrators that neither isolate suspects nor claim
-- directly): to enqueued, every ready step alike; the orchestrator then
-- calls tasker_mark_dispatched for the steps it sent.
CREATE OR REPLACE FUNCTION tasker_claim_steps(p_owner text, p_limit int, p_lease_ms int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[])
LANGUAGE sql AS $$
  SELECT c.step_id, c.task_id, c.step_name, c.handler, c.handler_config, c.attempt, c.timeout_ms, c.context,
         c.dep_names, c.dep_outputs
    FROM tasker_claim(p_owner, p_limit, p_lease_ms, 'enqueued', NULL, 0) c
$$;

-- Version 2 (db/migrate/0008; orchestrators that isolate suspects and then
-- call tasker_mark_dispatched): to enqueued, with the suspect budget.
CREATE OR REPLACE FUNCTION tasker_claim_steps_v2(p_owner text, p_limit int, p_lease_ms int, p_suspect_lost int,
                                                 p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE sql AS $$
  SELECT * FROM tasker_claim(p_owner, p_limit, p_lease_ms, 'enqueued', p_suspect_lost, p_suspect_limit)
$$;

-- Version 3, the orchestration loop's: as version 2, claimed straight to
-- in_progress, so there is no tasker_mark_dispatched call. A claimed step
-- the orchestrator could not send goes back with tasker_release_steps.
CREATE FUNCTION tasker_claim_steps_v3(p_owner text, p_limit int, p_lease_ms int, p_suspect_lost int,
                                      p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE sql AS $$
  SELECT * FROM tasker_claim(p_owner, p_limit, p_lease_ms, 'in_progress', p_suspect_lost, p_suspect_limit)
$$;

-- ---------------------------------------------------------------------------
-- One writer per stored counter. pending_parents (after creation) is written
-- only by tasker_release_children; remaining_steps and a task's state only
-- by tasker_settle_tasks. tasker_apply_results, tasker_steps_done and
-- tasker_finalize_tasks (and through them tasker_resolve_step,
-- tasker_retry_step and tasker_release_lost_steps) call them.

-- The children of steps that became complete or resolved_manually have one
-- parent fewer to wait for.
CREATE FUNCTION tasker_release_children(p_step_ids bigint[]) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
BEGIN
  UPDATE tasker_workflow_steps c SET pending_parents = c.pending_parents - d.n
    FROM (SELECT e.to_step_id, count(*)::int AS n FROM tasker_workflow_step_edges e
           WHERE e.from_step_id = ANY (p_step_ids) GROUP BY e.to_step_id) d
   WHERE c.id = d.to_step_id;
END $$;

-- Each task of p_task_ids once, in id order: its remaining_steps less its
-- steps done now (p_done_task_ids: one element per step that became complete
-- or resolved_manually, its task id), and the state its steps call for:
--   no step left                                        -> complete
--   a step in error (and the task pending/in_progress)  -> error
--   in error but no step in error any more              -> in_progress
-- The state changes are logged, and 'tasker_task_finished' notified for the
-- tasks that finished. Returns how many tasks changed state.
CREATE FUNCTION tasker_settle_tasks(p_task_ids bigint[], p_done_task_ids bigint[]) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_changed int;
  v_finished bigint[];
BEGIN
  WITH d AS (
    SELECT x.task_id, count(*)::int AS n FROM unnest(p_done_task_ids) AS x(task_id) GROUP BY x.task_id
  ), cand AS (
    SELECT t.id, t.state AS old_state, t.remaining_steps - coalesce(d.n, 0) AS remaining,
           CASE
             WHEN t.state NOT IN ('pending', 'in_progress', 'error') THEN NULL
             WHEN t.remaining_steps - coalesce(d.n, 0) = 0 THEN 'complete'
             WHEN t.state <> 'error' AND EXISTS (
               SELECT 1 FROM tasker_workflow_steps s WHERE s.task_id = t.id AND s.state = 'error') THEN 'error'
             WHEN t.state = 'error' AND NOT EXISTS (
               SELECT 1 FROM tasker_workflow_steps s WHERE s.task_id = t.id AND s.state = 'error') THEN 'in_progress'
           END AS to_state
      FROM tasker_tasks t LEFT JOIN d ON d.task_id = t.id
     WHERE t.id = ANY (p_task_ids)
     ORDER BY t.id
       FOR UPDATE OF t
  ), moved AS (
    UPDATE tasker_tasks t
       SET remaining_steps = c.remaining, state = coalesce(c.to_state, t.state), updated_at = now(),
           finished_at = CASE WHEN c.to_state IS NULL THEN t.finished_at
                              WHEN c.to_state IN ('complete', 'error') THEN now() END
      FROM cand c
     WHERE t.id = c.id AND (c.to_state IS NOT NULL OR c.remaining <> t.remaining_steps)
    RETURNING t.id, c.old_state, c.to_state
  ), logged AS (
    INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
    SELECT m.id, m.old_state, m.to_state, 'finalize' FROM moved m WHERE m.to_state IS NOT NULL
  )
  SELECT count(*) FILTER (WHERE m.to_state IS NOT NULL),
         array_agg(m.id ORDER BY m.id) FILTER (WHERE m.to_state IN ('complete', 'error'))
    INTO v_changed, v_finished FROM moved m;

  IF v_finished IS NOT NULL THEN
    PERFORM pg_notify('tasker_task_finished', f::text) FROM unnest(v_finished) AS f;
  END IF;
  RETURN v_changed;
END $$;

CREATE OR REPLACE FUNCTION tasker_finalize_tasks(p_task_ids bigint[]) RETURNS int
LANGUAGE sql AS $$
  SELECT tasker_settle_tasks(p_task_ids, '{}'::bigint[])
$$;

CREATE OR REPLACE FUNCTION tasker_steps_done(p_step_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_tasks bigint[];
BEGIN
  PERFORM tasker_release_children(p_step_ids);
  SELECT array_agg(s.task_id) INTO v_tasks FROM tasker_workflow_steps s WHERE s.id = ANY (p_step_ids);
  PERFORM tasker_settle_tasks(v_tasks, v_tasks);
END $$;

-- As in version 1; the children and the tasks through the functions above.
CREATE OR REPLACE FUNCTION tasker_apply_results(p_step_ids bigint[], p_attempts int[], p_success boolean[],
                                                p_outputs bytea[], p_errors bytea[], p_retryable boolean[],
                                                p_retry_after_ms int[])
RETURNS TABLE (applied int, stale int)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_total int := coalesce(cardinality(p_step_ids), 0);
  v_ids bigint[]; v_attempts int[]; v_success boolean[]; v_outputs bytea[]; v_errors bytea[];
  v_retryable boolean[]; v_after int[]; v_old text[];
  v_done bigint[];
  v_done_tasks bigint[];
  v_tasks bigint[];
BEGIN
  -- Lock the rows still in flight with the attempt reported; a duplicate
  -- within the call (first wins), a late result (the step moved on) or an
  -- old attempt is left out and counted as stale.
  SELECT array_agg(t.id ORDER BY t.id), array_agg(t.attempt ORDER BY t.id), array_agg(t.success ORDER BY t.id),
         array_agg(t.output ORDER BY t.id), array_agg(t.error ORDER BY t.id),
         array_agg(t.retryable ORDER BY t.id), array_agg(t.retry_after_ms ORDER BY t.id),
         array_agg(t.old_state ORDER BY t.id)
    INTO v_ids, v_attempts, v_success, v_outputs, v_errors, v_retryable, v_after, v_old
    FROM (SELECT s.id, x.attempt, coalesce(x.success, false) AS success, x.output, x.error,
                 coalesce(x.retryable, true) AS retryable, x.retry_after_ms, s.state AS old_state
            FROM (SELECT DISTINCT ON (u.id) u.*
                    FROM unnest(p_step_ids, p_attempts, p_success, p_outputs, p_errors, p_retryable,
                                p_retry_after_ms)
                         WITH ORDINALITY AS u(id, attempt, success, output, error, retryable, retry_after_ms, ord)
                   ORDER BY u.id, u.ord) x
            JOIN tasker_workflow_steps s ON s.id = x.id
           WHERE s.attempts = x.attempt AND s.state IN ('enqueued', 'in_progress')
           ORDER BY s.id
             FOR UPDATE OF s) t;

  IF v_ids IS NULL THEN
    RETURN QUERY SELECT 0, v_total;
    RETURN;
  END IF;

  -- success: complete with its output. failure: failures + 1; back to
  -- pending after a backoff while retryable and attempts remain (the
  -- handler's retry_after wins over the exponential backoff), else error.
  WITH r AS (
    SELECT * FROM unnest(v_ids, v_attempts, v_success, v_outputs, v_errors, v_retryable, v_after, v_old)
           AS r(id, attempt, success, output, error, retryable, retry_after_ms, old_state)
  ), upd AS (
    UPDATE tasker_workflow_steps s
       SET state = CASE WHEN r.success THEN 'complete'
                        WHEN r.retryable AND s.retryable AND s.failures + 1 < s.max_attempts THEN 'pending'
                        ELSE 'error' END,
           failures = CASE WHEN r.success THEN s.failures ELSE s.failures + 1 END,
           output = CASE WHEN r.success THEN r.output ELSE s.output END,
           last_error = CASE WHEN r.success THEN s.last_error ELSE r.error END,
           last_failure_at = CASE WHEN r.success THEN s.last_failure_at ELSE now() END,
           next_attempt_at = CASE
             WHEN r.success THEN s.next_attempt_at
             WHEN r.retry_after_ms IS NOT NULL THEN now() + r.retry_after_ms * interval '1 millisecond'
             ELSE now() + least(s.backoff_cap_ms::float8, s.backoff_base_ms * power(2::float8, s.failures))
                          * (1 - s.jitter * random()) * interval '1 millisecond'
           END,
           finished_at = CASE
             WHEN r.success OR NOT (r.retryable AND s.retryable AND s.failures + 1 < s.max_attempts) THEN now()
           END,
           claimed_by = NULL, claim_deadline = NULL, updated_at = now()
      FROM r
     WHERE s.id = r.id
    RETURNING s.id, s.task_id, s.state, r.attempt, r.old_state, r.success
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
    SELECT upd.id, upd.task_id, upd.old_state, upd.state, upd.attempt,
           CASE WHEN upd.success THEN 'result' WHEN upd.state = 'pending' THEN 'retry' ELSE 'failed' END
      FROM upd
  )
  SELECT array_agg(upd.id) FILTER (WHERE upd.state = 'complete'),
         array_agg(upd.task_id) FILTER (WHERE upd.state = 'complete'),
         array_agg(DISTINCT upd.task_id)
    INTO v_done, v_done_tasks, v_tasks FROM upd;

  IF v_done IS NOT NULL THEN
    PERFORM tasker_release_children(v_done);
  END IF;
  PERFORM tasker_settle_tasks(v_tasks, coalesce(v_done_tasks, '{}'::bigint[]));

  RETURN QUERY SELECT cardinality(v_ids), v_total - cardinality(v_ids);
END $$;
