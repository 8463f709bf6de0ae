-- tasker_core schema, version 1: templates, tasks, workflow steps and their
-- dependency edges, append-only transition histories, and the functions the
-- orchestration loop (C, through libpq), the Ruby API and the specs share.
-- Applied by TaskerCore::Store.migrate! in one transaction. docs/store.md
-- describes the tables and state machines.
--
-- Payloads the C loop splices into msgpack messages (context,
-- handler_config, outputs, errors) are msgpack in bytea columns.
-- An illegal state transition raises SQLSTATE TK001.

CREATE TABLE tasker_task_templates (
  id          bigserial PRIMARY KEY,
  namespace   text NOT NULL,
  name        text NOT NULL,
  version     text NOT NULL,
  definition  jsonb NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  UNIQUE (namespace, name, version)
);

CREATE TABLE tasker_tasks (
  id              bigserial PRIMARY KEY,
  template_id     bigint NOT NULL REFERENCES tasker_task_templates (id),
  namespace       text NOT NULL,
  name            text NOT NULL,
  version         text NOT NULL,
  state           text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'in_progress', 'complete', 'error', 'cancelled')),
  context         bytea NOT NULL,
  identity_key    text UNIQUE,
  step_count      int NOT NULL CHECK (step_count > 0),
  remaining_steps int NOT NULL CHECK (remaining_steps >= 0),  -- steps not complete/resolved_manually
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  finished_at     timestamptz
);
CREATE INDEX tasker_tasks_unfinished ON tasker_tasks (id) WHERE state IN ('pending', 'in_progress');

-- Steps, edges and the histories carry no foreign keys (tasks keep theirs to
-- templates). Their rows are written only by the functions below, in the
-- statement (tasker_create_task: the call) that writes the task or step they
-- belong to, so they cannot point at a missing row. A key check is a query
-- and a row lock per written row: about 10 per task created (one per step)
-- and 4 per step run (one per transition), more than the rest of the work,
-- and its plan, cached per connection, goes on scanning the parent table
-- whole when it was made while the table looked empty. Deleting (or
-- truncating) tasks or steps removes what belongs to them through the
-- statement-level triggers below, as ON DELETE CASCADE did.
CREATE TABLE tasker_workflow_steps (
  id               bigserial PRIMARY KEY,
  task_id          bigint NOT NULL,
  name             text NOT NULL,
  handler          text NOT NULL,
  handler_config   bytea NOT NULL,
  state            text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'enqueued', 'in_progress', 'complete', 'error',
                                    'cancelled', 'resolved_manually')),
  pending_parents  int NOT NULL CHECK (pending_parents >= 0),  -- parents not yet complete/resolved
  attempts         int NOT NULL DEFAULT 0 CHECK (attempts >= 0),  -- claims so far (the current attempt)
  failures         int NOT NULL DEFAULT 0 CHECK (failures >= 0),  -- failed attempts since the last retry_step
  retryable        boolean NOT NULL DEFAULT true,
  max_attempts     int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
  backoff_base_ms  int NOT NULL DEFAULT 500 CHECK (backoff_base_ms >= 0),
  backoff_cap_ms   int NOT NULL DEFAULT 30000 CHECK (backoff_cap_ms >= 0),
  jitter           float8 NOT NULL DEFAULT 0.2 CHECK (jitter >= 0 AND jitter <= 1),
  timeout_ms       int NOT NULL CHECK (timeout_ms > 0),
  next_attempt_at  timestamptz NOT NULL DEFAULT now(),
  claimed_by       text,
  claim_deadline   timestamptz,
  output           bytea,
  last_error       bytea,
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  last_attempt_at  timestamptz,  -- last claim
  last_failure_at  timestamptz,
  finished_at      timestamptz,
  UNIQUE (task_id, name)
);
-- Readiness: only pending steps with no unfinished parent are in this index,
-- so finding ready work costs what the ready work costs, not the history.
CREATE INDEX tasker_workflow_steps_ready ON tasker_workflow_steps (next_attempt_at, id)
  WHERE state = 'pending' AND pending_parents = 0;
-- In-flight steps by deadline, for tasker_requeue_expired.
CREATE INDEX tasker_workflow_steps_in_flight ON tasker_workflow_steps (claim_deadline)
  WHERE state IN ('enqueued', 'in_progress');
-- Failed steps, for task finalization.
CREATE INDEX tasker_workflow_steps_errored ON tasker_workflow_steps (task_id) WHERE state = 'error';

CREATE TABLE tasker_workflow_step_edges (
  from_step_id bigint NOT NULL,
  to_step_id   bigint NOT NULL,
  PRIMARY KEY (from_step_id, to_step_id),
  CHECK (from_step_id <> to_step_id)
);
CREATE INDEX tasker_workflow_step_edges_to ON tasker_workflow_step_edges (to_step_id);

-- The two histories are append-only logs, written by the functions in the
-- statement that makes the change. Keyed by (owner, id): the one index both identifies a row and reads one
-- task's or step's history in order (one index entry per appended row).
CREATE TABLE tasker_task_transitions (
  id         bigserial NOT NULL,
  task_id    bigint NOT NULL,
  from_state text,
  to_state   text NOT NULL,
  reason     text,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (task_id, id)
);

CREATE TABLE tasker_workflow_step_transitions (
  id         bigserial NOT NULL,
  step_id    bigint NOT NULL,
  task_id    bigint NOT NULL,
  from_state text,
  to_state   text NOT NULL,
  attempt    int NOT NULL,
  owner      text,
  reason     text,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (step_id, id)
);

-- ---------------------------------------------------------------------------
-- State machines, enforced on every UPDATE that changes a state. The legal
-- transitions are the triggers' WHEN conditions, evaluated inline for each
-- updated row without a function call; the PL/pgSQL function only runs to
-- raise, for an illegal one. So a direct UPDATE by anyone is refused, and a
-- legal change (three per step run) costs one expression, not a trigger call.

CREATE FUNCTION tasker_refuse_step_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'illegal workflow step transition % -> % (step %)', OLD.state, NEW.state, OLD.id
    USING ERRCODE = 'TK001';
END $$;

CREATE TRIGGER tasker_workflow_steps_state_guard
  BEFORE UPDATE OF state ON tasker_workflow_steps
  FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT (
    (OLD.state = 'pending'     AND NEW.state IN ('enqueued', 'cancelled', 'resolved_manually')) OR
    (OLD.state = 'enqueued'    AND NEW.state IN ('in_progress', 'pending', 'complete', 'error',
                                                 'cancelled', 'resolved_manually')) OR
    (OLD.state = 'in_progress' AND NEW.state IN ('pending', 'complete', 'error', 'cancelled',
                                                 'resolved_manually')) OR
    (OLD.state = 'error'       AND NEW.state IN ('pending', 'cancelled', 'resolved_manually'))))
  EXECUTE FUNCTION tasker_refuse_step_transition();

CREATE FUNCTION tasker_refuse_task_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'illegal task transition % -> % (task %)', OLD.state, NEW.state, OLD.id
    USING ERRCODE = 'TK001';
END $$;

CREATE TRIGGER tasker_tasks_state_guard
  BEFORE UPDATE OF state ON tasker_tasks
  FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT (
    (OLD.state = 'pending'     AND NEW.state IN ('in_progress', 'complete', 'error', 'cancelled')) OR
    (OLD.state = 'in_progress' AND NEW.state IN ('complete', 'error', 'cancelled')) OR
    (OLD.state = 'error'       AND NEW.state IN ('in_progress', 'complete', 'cancelled'))))
  EXECUTE FUNCTION tasker_refuse_task_transition();

-- What belongs to a deleted task or step goes with it (no foreign keys, see
-- tasker_workflow_steps): one DELETE per table per statement, through the
-- transition table. Deleting a task deletes its steps, which deletes their
-- edges and history.
CREATE FUNCTION tasker_delete_task_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM tasker_task_transitions h USING gone WHERE h.task_id = gone.id;
  DELETE FROM tasker_workflow_steps s USING gone WHERE s.task_id = gone.id;
  RETURN NULL;
END $$;

CREATE TRIGGER tasker_tasks_delete_rows
  AFTER DELETE ON tasker_tasks REFERENCING OLD TABLE AS gone
  FOR EACH STATEMENT EXECUTE FUNCTION tasker_delete_task_rows();

CREATE FUNCTION tasker_delete_step_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM tasker_workflow_step_transitions h USING gone WHERE h.step_id = gone.id;
  DELETE FROM tasker_workflow_step_edges e USING gone WHERE e.from_step_id = gone.id;
  DELETE FROM tasker_workflow_step_edges e USING gone WHERE e.to_step_id = gone.id;
  RETURN NULL;
END $$;

CREATE TRIGGER tasker_workflow_steps_delete_rows
  AFTER DELETE ON tasker_workflow_steps REFERENCING OLD TABLE AS gone
  FOR EACH STATEMENT EXECUTE FUNCTION tasker_delete_step_rows();

-- TRUNCATE of tasks or steps empties what belongs to them (a DELETE: a
-- TRUNCATE that names those tables too has them open already; they are then
-- empty and the DELETE is free).
CREATE FUNCTION tasker_truncate_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM tasker_workflow_step_transitions;
  DELETE FROM tasker_workflow_step_edges;
  IF TG_TABLE_NAME = 'tasker_tasks' THEN
    DELETE FROM tasker_task_transitions;
    DELETE FROM tasker_workflow_steps;
  END IF;
  RETURN NULL;
END $$;

CREATE TRIGGER tasker_tasks_truncate_rows
  AFTER TRUNCATE ON tasker_tasks FOR EACH STATEMENT EXECUTE FUNCTION tasker_truncate_rows();
CREATE TRIGGER tasker_workflow_steps_truncate_rows
  AFTER TRUNCATE ON tasker_workflow_steps FOR EACH STATEMENT EXECUTE FUNCTION tasker_truncate_rows();

-- ---------------------------------------------------------------------------
-- Helpers.

-- A msgpack str for a text (up to 65535 bytes), so SQL can write error maps.
CREATE FUNCTION tasker_msgpack_str(p text) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT CASE
    WHEN octet_length(b) < 32 THEN set_byte('\x00'::bytea, 0, 160 + octet_length(b)) || b
    WHEN octet_length(b) < 256 THEN '\xd9'::bytea || set_byte('\x00'::bytea, 0, octet_length(b)) || b
    ELSE '\xda'::bytea || substring(int4send(least(octet_length(b), 65535)) FROM 3 FOR 2)
         || substring(b FROM 1 FOR 65535)
  END
  FROM (SELECT convert_to(p, 'UTF8') AS b) AS x
$$;

-- The msgpack error map for a step that timed out:
-- {"class"=>"TaskerCore::StepTimeoutError", "message"=>..., "backtrace"=>[], "retryable"=>true, "retry_after"=>nil}
CREATE FUNCTION tasker_timeout_error(p_message text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
  SELECT '\x85'::bytea
    || tasker_msgpack_str('class') || tasker_msgpack_str('TaskerCore::StepTimeoutError')
    || tasker_msgpack_str('message') || tasker_msgpack_str(p_message)
    || tasker_msgpack_str('backtrace') || '\x90'::bytea
    || tasker_msgpack_str('retryable') || '\xc3'::bytea
    || tasker_msgpack_str('retry_after') || '\xc0'::bytea
$$;

-- Moves each task to the state its steps call for, appends transitions and
-- notifies 'tasker_task_finished' for tasks that finished:
--   all steps complete/resolved_manually             -> complete
--   a step in error (and the task pending/in_progress) -> error
--   in error but no step in error any more            -> in_progress
-- Returns how many tasks changed state.
CREATE FUNCTION tasker_finalize_tasks(p_task_ids bigint[]) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_changed int;
  v_finished bigint[];
BEGIN
  -- One statement for all the tasks: lock them in id order, compute each
  -- one's target state, move those that change and log them.
  WITH cand AS (
    SELECT t.id, t.state AS old_state,
           CASE
             WHEN t.remaining_steps = 0 THEN 'complete'
             WHEN t.state <> 'error' AND EXISTS (
               SELECT 1 FROM tasker_workflow_steps s WHERE s.task_id = t.id AND s.state = 'error') THEN 'error'
             WHEN t.state = 'error' AND NOT EXISTS (
               SELECT 1 FROM tasker_workflow_steps s WHERE s.task_id = t.id AND s.state = 'error') THEN 'in_progress'
           END AS to_state
      FROM tasker_tasks t
     WHERE t.id = ANY (p_task_ids) AND t.state IN ('pending', 'in_progress', 'error')
     ORDER BY t.id
       FOR UPDATE OF t
  ), moved AS (
    UPDATE tasker_tasks t
       SET state = c.to_state, updated_at = now(),
           finished_at = CASE WHEN c.to_state IN ('complete', 'error') THEN now() END
      FROM cand c
     WHERE t.id = c.id AND c.to_state IS NOT NULL
    RETURNING t.id, c.old_state, c.to_state
  ), logged AS (
    INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
    SELECT m.id, m.old_state, m.to_state, 'finalize' FROM moved m
  )
  SELECT count(*), array_agg(m.id ORDER BY m.id) FILTER (WHERE m.to_state IN ('complete', 'error'))
    INTO v_changed, v_finished FROM moved m;

  IF v_finished IS NOT NULL THEN
    PERFORM pg_notify('tasker_task_finished', f::text) FROM unnest(v_finished) AS f;
  END IF;
  RETURN v_changed;
END $$;

-- Steps that became complete or resolved_manually: their children have one
-- parent fewer to wait for, their tasks one step fewer.
CREATE FUNCTION tasker_steps_done(p_step_ids bigint[]) RETURNS void LANGUAGE sql AS $$
  UPDATE tasker_workflow_steps c SET pending_parents = c.pending_parents - d.n
    FROM (SELECT e.to_step_id, count(*)::int AS n FROM tasker_workflow_step_edges e
          WHERE e.from_step_id = ANY (p_step_ids) GROUP BY e.to_step_id) d
   WHERE c.id = d.to_step_id;
  UPDATE tasker_tasks t SET remaining_steps = t.remaining_steps - d.n, updated_at = now()
    FROM (SELECT s.task_id, count(*)::int AS n FROM tasker_workflow_steps s
          WHERE s.id = ANY (p_step_ids) GROUP BY s.task_id) d
   WHERE t.id = d.task_id;
$$;

-- ---------------------------------------------------------------------------
-- Creating tasks (one round trip). Step arrays are parallel, one element per
-- step; edges name steps by name. Returns the task id and whether it was
-- created (false: a task with this identity_key already existed).
CREATE FUNCTION tasker_create_task(
  p_namespace text, p_name text, p_version text, p_definition jsonb, p_context bytea, p_identity_key text,
  p_step_names text[], p_handlers text[], p_handler_configs bytea[], p_timeouts_ms int[],
  p_retryable boolean[], p_max_attempts int[], p_backoff_base_ms int[], p_backoff_cap_ms int[],
  p_jitter float8[], p_edge_from text[], p_edge_to text[])
RETURNS TABLE (task_id bigint, created boolean) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_template bigint;
  v_task bigint;
BEGIN
  -- The template as stored (the common case: one read, no write), else
  -- stored or updated now.
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

  INSERT INTO tasker_tasks (template_id, namespace, name, version, context, identity_key,
                            step_count, remaining_steps)
  VALUES (v_template, p_namespace, p_name, p_version, p_context, p_identity_key,
          cardinality(p_step_names), cardinality(p_step_names))
  ON CONFLICT (identity_key) DO NOTHING
  RETURNING id INTO v_task;
  IF v_task IS NULL THEN
    -- the existing task (a concurrent insert has committed: ON CONFLICT waited for it)
    RETURN QUERY SELECT t.id, false FROM tasker_tasks t WHERE t.identity_key = p_identity_key;
    RETURN;
  END IF;

  -- Steps, edges and the creation transitions in one statement, from the
  -- rows the INSERT returns (no read of the steps table).
  WITH steps AS (
    INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, pending_parents, retryable,
                                       max_attempts, backoff_base_ms, backoff_cap_ms, jitter, timeout_ms)
    SELECT v_task, x.name, x.handler, x.config, coalesce(p.n, 0),
           x.retryable, x.max_attempts, x.base, x.cap, x.jitter, x.timeout
      FROM unnest(p_step_names, p_handlers, p_handler_configs, p_timeouts_ms, p_retryable, p_max_attempts,
                  p_backoff_base_ms, p_backoff_cap_ms, p_jitter)
           WITH ORDINALITY AS x(name, handler, config, timeout, retryable, max_attempts, base, cap, jitter, ord)
      LEFT JOIN (SELECT e.to_name, count(*)::int AS n FROM unnest(p_edge_to) AS e(to_name) GROUP BY e.to_name) p
        ON p.to_name = x.name
     ORDER BY x.ord  -- ids in template order
    RETURNING id, name
  ), edges AS (
    INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id)
    SELECT f.id, t.id
      FROM unnest(p_edge_from, p_edge_to) AS e(from_name, to_name)
      JOIN steps f ON f.name = e.from_name
      JOIN steps t ON t.name = e.to_name
  )
  INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
  SELECT s.id, v_task, NULL, 'pending', 0, 'created' FROM steps s;

  INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
  VALUES (v_task, NULL, 'pending', 'created');

  PERFORM pg_notify('tasker_steps_ready', '');
  RETURN QUERY SELECT v_task, true;
END $$;

-- ---------------------------------------------------------------------------
-- The orchestration loop's functions (see docs/store.md).

-- The loop's functions run every statement with a plan made for the call
-- (plan_cache_mode = force_custom_plan): a plan cached while the tables were
-- small (a new or just truncated database) would keep scanning them whole as
-- they grow. Planning costs a few µs per call of up to a batch of steps.
CREATE FUNCTION tasker_claim_steps(p_owner text, p_limit int, p_lease_ms int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[])
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
BEGIN
  -- One statement: lock the ready steps, claim them, log them, start their
  -- pending tasks, and return them with their context and parents' outputs.
  RETURN QUERY
  WITH ready AS (
    SELECT s.id FROM tasker_workflow_steps s
      JOIN tasker_tasks t ON t.id = s.task_id
     WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.next_attempt_at <= now()
       AND t.state IN ('pending', 'in_progress')
     ORDER BY s.next_attempt_at, s.id
     LIMIT p_limit
     FOR UPDATE OF s SKIP LOCKED
  ), claimed AS (
    UPDATE tasker_workflow_steps s
       SET state = 'enqueued', attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
      FROM ready WHERE s.id = ready.id
    RETURNING s.id, s.task_id, s.name, s.handler, s.handler_config, s.attempts, s.timeout_ms
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
         coalesce(d.names, '{}'::text[]), coalesce(d.outputs, '{}'::bytea[])
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

CREATE FUNCTION tasker_mark_dispatched(p_step_ids bigint[], p_attempts int[]) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
  v_n int;
BEGIN
  WITH moved AS (
    UPDATE tasker_workflow_steps s SET state = 'in_progress', updated_at = now()
      FROM unnest(p_step_ids, p_attempts) AS x(id, attempt)
     WHERE s.id = x.id AND s.attempts = x.attempt AND s.state = 'enqueued'
    RETURNING s.id, s.task_id, s.attempts, s.claimed_by
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
    SELECT m.id, m.task_id, 'enqueued', 'in_progress', m.attempts, m.claimed_by, 'dispatched' FROM moved m
  )
  SELECT count(*) INTO v_n FROM moved;
  RETURN v_n;
END $$;

CREATE FUNCTION tasker_apply_results(p_step_ids bigint[], p_attempts int[], p_success boolean[],
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
  v_finished bigint[];
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

  -- The children of the completed steps have one parent fewer to wait for.
  IF v_done IS NOT NULL THEN
    UPDATE tasker_workflow_steps c SET pending_parents = c.pending_parents - d.n
      FROM (SELECT e.to_step_id, count(*)::int AS n FROM tasker_workflow_step_edges e
             WHERE e.from_step_id = ANY (v_done) GROUP BY e.to_step_id) d
     WHERE c.id = d.to_step_id;
  END IF;

  -- Each task once per call, in id order: its remaining_steps counter less
  -- its steps completed here, and the state its steps call for (as
  -- tasker_finalize_tasks), in one UPDATE; the state changes logged.
  WITH d AS (
    SELECT x.task_id, count(*)::int AS n FROM unnest(v_done_tasks) AS x(task_id) GROUP BY x.task_id
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
     WHERE t.id = ANY (v_tasks)
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
  SELECT array_agg(m.id ORDER BY m.id) FILTER (WHERE m.to_state IN ('complete', 'error'))
    INTO v_finished FROM moved m;

  IF v_finished IS NOT NULL THEN
    PERFORM pg_notify('tasker_task_finished', f::text) FROM unnest(v_finished) AS f;
  END IF;

  RETURN QUERY SELECT cardinality(v_ids), v_total - cardinality(v_ids);
END $$;

CREATE FUNCTION tasker_release_steps(p_step_ids bigint[], p_attempts int[]) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
  v_n int;
BEGIN
  WITH target AS (
    SELECT s.id, s.state AS old_state FROM tasker_workflow_steps s
      JOIN unnest(p_step_ids, p_attempts) AS x(id, attempt) ON s.id = x.id AND s.attempts = x.attempt
     WHERE s.state IN ('enqueued', 'in_progress')
     ORDER BY s.id
       FOR UPDATE OF s
  ), moved AS (
    UPDATE tasker_workflow_steps s
       SET state = 'pending', next_attempt_at = now(), claimed_by = NULL, claim_deadline = NULL,
           updated_at = now()
      FROM target WHERE s.id = target.id
    RETURNING s.id, s.task_id, s.attempts, target.old_state
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
    SELECT m.id, m.task_id, m.old_state, 'pending', m.attempts, 'released' FROM moved m
  )
  SELECT count(*) INTO v_n FROM moved;
  IF v_n > 0 THEN
    PERFORM pg_notify('tasker_steps_ready', '');
  END IF;
  RETURN v_n;
END $$;

CREATE FUNCTION tasker_requeue_expired(p_limit int) RETURNS int
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
  v_ids bigint[];
  v_attempts int[];
  v_applied int;
BEGIN
  SELECT array_agg(e.id), array_agg(e.attempts) INTO v_ids, v_attempts
    FROM (SELECT s.id, s.attempts FROM tasker_workflow_steps s
           WHERE s.state IN ('enqueued', 'in_progress') AND s.claim_deadline < now()
           ORDER BY s.claim_deadline
           LIMIT p_limit
             FOR UPDATE SKIP LOCKED) e;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  SELECT r.applied INTO v_applied
    FROM tasker_apply_results(
      v_ids, v_attempts, array_fill(false, ARRAY[cardinality(v_ids)]),
      array_fill(NULL::bytea, ARRAY[cardinality(v_ids)]),
      array_fill(tasker_timeout_error('no result before the claim deadline (step timeout plus lease)'),
                 ARRAY[cardinality(v_ids)]),
      array_fill(true, ARRAY[cardinality(v_ids)]),
      array_fill(NULL::int, ARRAY[cardinality(v_ids)])) r;
  RETURN v_applied;
END $$;

-- ---------------------------------------------------------------------------
-- Steering by hand.

-- Cancels an unfinished task and its unfinished steps. Returns false when the
-- task was already complete or cancelled (or does not exist).
CREATE FUNCTION tasker_cancel_task(p_task_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  v_old text;
BEGIN
  SELECT state INTO v_old FROM tasker_tasks WHERE id = p_task_id FOR UPDATE;
  IF v_old IS NULL OR v_old IN ('complete', 'cancelled') THEN
    RETURN false;
  END IF;
  WITH target AS (
    SELECT s.id, s.state AS old_state FROM tasker_workflow_steps s
     WHERE s.task_id = p_task_id AND s.state IN ('pending', 'enqueued', 'in_progress')
     ORDER BY s.id FOR UPDATE
  ), moved AS (
    UPDATE tasker_workflow_steps s
       SET state = 'cancelled', claimed_by = NULL, claim_deadline = NULL, finished_at = now(), updated_at = now()
      FROM target WHERE s.id = target.id
    RETURNING s.id, s.attempts, target.old_state
  )
  INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
  SELECT m.id, p_task_id, m.old_state, 'cancelled', m.attempts, 'cancel_task' FROM moved m;
  UPDATE tasker_tasks SET state = 'cancelled', finished_at = now(), updated_at = now() WHERE id = p_task_id;
  INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason)
  VALUES (p_task_id, v_old, 'cancelled', 'cancel_task');
  PERFORM pg_notify('tasker_task_finished', p_task_id::text);
  RETURN true;
END $$;

-- error -> pending now, failures reset; the task resumes when no step is
-- left in error. Returns false when the step is not in error or its task
-- was cancelled.
CREATE FUNCTION tasker_retry_step(p_step_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  v_task bigint;
BEGIN
  UPDATE tasker_workflow_steps s
     SET state = 'pending', failures = 0, next_attempt_at = now(), finished_at = NULL, updated_at = now()
    FROM tasker_tasks t
   WHERE s.id = p_step_id AND s.state = 'error' AND t.id = s.task_id AND t.state <> 'cancelled'
  RETURNING s.task_id INTO v_task;
  IF v_task IS NULL THEN
    RETURN false;
  END IF;
  INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
  SELECT p_step_id, v_task, 'error', 'pending', s.attempts, 'retry_step'
    FROM tasker_workflow_steps s WHERE s.id = p_step_id;
  PERFORM tasker_finalize_tasks(ARRAY[v_task]);
  PERFORM pg_notify('tasker_steps_ready', '');
  RETURN true;
END $$;

-- Any unfinished (or failed) step -> resolved_manually with the given output;
-- it counts as done for its dependents and for task finalization. A result
-- that arrives later for it is stale. Returns false when the step was
-- already finished (complete, cancelled, resolved_manually).
CREATE FUNCTION tasker_resolve_step(p_step_id bigint, p_output bytea) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  v_task bigint;
  v_old text;
  v_attempt int;
BEGIN
  SELECT s.task_id, s.state, s.attempts INTO v_task, v_old, v_attempt
    FROM tasker_workflow_steps s WHERE s.id = p_step_id FOR UPDATE;
  IF v_old IS NULL OR v_old NOT IN ('pending', 'enqueued', 'in_progress', 'error') THEN
    RETURN false;
  END IF;
  UPDATE tasker_workflow_steps
     SET state = 'resolved_manually', output = p_output, claimed_by = NULL, claim_deadline = NULL,
         finished_at = now(), updated_at = now()
   WHERE id = p_step_id;
  INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
  VALUES (p_step_id, v_task, v_old, 'resolved_manually', v_attempt, 'resolve_step');
  PERFORM tasker_steps_done(ARRAY[p_step_id]);
  PERFORM tasker_finalize_tasks(ARRAY[v_task]);
  PERFORM pg_notify('tasker_steps_ready', '');
  RETURN true;
END $$;
