-- tasker_core schema, version 11: queues, priorities, scheduled start and
-- concurrency limits.
--
-- Each step has a queue (the template's or the task's, else 'default'), a
-- priority (-100..100, higher first) and optionally a concurrency key and
-- limit (computed from the task's context at creation). A task may start
-- later: its steps are created with next_attempt_at = its run_at.
--
-- tasker_claim_queued claims for a list of queues, each up to the room its
-- workers have, in claim order: ready time less priority seconds (so one
-- priority point is worth one second of waiting, and a step is passed by
-- steps that became ready after it for at most 200 s). Concurrency limits
-- (per queue, from the orchestrator's configuration; per key, stored on the
-- step) are checked under one transaction-scoped advisory lock, taken only
-- when a claim meets a limited queue or a keyed step, so they hold across
-- orchestrators sharing the database. Older orchestrators (tasker_claim and
-- the tasker_claim_steps* functions) claim from the queue 'default' only.

ALTER TABLE tasker_workflow_steps
  ADD COLUMN queue text NOT NULL DEFAULT 'default',
  ADD COLUMN priority int NOT NULL DEFAULT 0,
  ADD COLUMN concurrency_key text,
  ADD COLUMN concurrency_limit int;
-- Checked for new rows (NOT VALID: no scan of the existing ones, which all
-- have the defaults).
ALTER TABLE tasker_workflow_steps
  ADD CONSTRAINT tasker_workflow_steps_priority CHECK (priority BETWEEN -100 AND 100) NOT VALID,
  ADD CONSTRAINT tasker_workflow_steps_concurrency
    CHECK ((concurrency_key IS NULL) = (concurrency_limit IS NULL) AND concurrency_limit >= 1) NOT VALID;

-- The order steps of one queue are claimed in: when a step became ready,
-- less a second per priority point. Seconds only, so it does not depend on
-- the time zone: immutable, and fit for an index.
CREATE FUNCTION tasker_claim_order(p_next_attempt_at timestamptz, p_priority int) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT p_next_attempt_at - p_priority * interval '1 second'
$$;

-- Ready steps per queue in claim order. It replaces version 1's
-- tasker_workflow_steps_ready (next_attempt_at, id): one index per ready
-- step, as before.
CREATE INDEX tasker_workflow_steps_queue_ready
  ON tasker_workflow_steps (queue, tasker_claim_order(next_attempt_at, priority), id)
  WHERE state = 'pending' AND pending_parents = 0;
DROP INDEX tasker_workflow_steps_ready;

-- In-flight steps with a concurrency key (only those: the index is empty
-- when no template sets a limit), counted per key by the claim
-- (tasker_key_has_room).
CREATE INDEX tasker_workflow_steps_in_flight_key ON tasker_workflow_steps (concurrency_key)
  WHERE concurrency_key IS NOT NULL AND state IN ('enqueued', 'in_progress');

-- ---------------------------------------------------------------------------
-- Creating tasks.

-- tasker_create_tasks (version 9) with the queue, priority, concurrency key
-- and limit of each step, either per step of the template (arrays of one
-- element per step: the same for every task, the usual case) or per task and
-- step (task by task, steps in template order), and per task when it may
-- start: p_run_at (NULL: now) or p_delay_s seconds from now (NULL: none).
-- NULL arrays: 'default', 0, no limit, now.
CREATE FUNCTION tasker_create_tasks_v2(
  p_namespace text, p_name text, p_version text, p_definition jsonb, p_contexts bytea[], p_identity_keys text[],
  p_step_names text[], p_handlers text[], p_handler_configs bytea[], p_timeouts_ms int[],
  p_retryable boolean[], p_max_attempts int[], p_backoff_base_ms int[], p_backoff_cap_ms int[],
  p_jitter float8[], p_edge_from text[], p_edge_to text[],
  p_queues text[], p_priorities int[], p_concurrency_keys text[], p_concurrency_limits int[],
  p_run_at timestamptz[], p_delay_s float8[])
RETURNS TABLE (task_id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_n int := coalesce(cardinality(p_contexts), 0);
  v_steps int := cardinality(p_step_names);
  -- placement arrays per step (shared by every task) or per task and step
  v_shared boolean := coalesce(cardinality(p_queues), v_steps) = v_steps;
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
           v_steps, v_steps
      FROM unnest(p_contexts, p_identity_keys) WITH ORDINALITY AS x(context, identity_key, ord)
     WHERE x.ord <= v_n
     ORDER BY x.identity_key, x.ord
    ON CONFLICT (identity_key) DO NOTHING
    RETURNING id
  )
  SELECT array_agg(ins.id ORDER BY ins.id) INTO v_new FROM ins;

  IF v_new IS NOT NULL THEN
    WITH steps AS (
      INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, pending_parents, retryable,
                                         max_attempts, backoff_base_ms, backoff_cap_ms, jitter, timeout_ms,
                                         queue, priority, concurrency_key, concurrency_limit, next_attempt_at)
      SELECT t.id, x.name, x.handler, x.config, coalesce(p.n, 0),
             x.retryable, x.max_attempts, x.base, x.cap, x.jitter, x.timeout,
             coalesce(p_queues[k.i], 'default'), coalesce(p_priorities[k.i], 0), p_concurrency_keys[k.i],
             CASE WHEN p_concurrency_keys[k.i] IS NOT NULL THEN p_concurrency_limits[k.i] END,
             coalesce(p_run_at[t.ord], now() + p_delay_s[t.ord] * interval '1 second', now())
        FROM unnest(v_ids) WITH ORDINALITY AS t(id, ord)
       CROSS JOIN unnest(p_step_names, p_handlers, p_handler_configs, p_timeouts_ms, p_retryable, p_max_attempts,
                         p_backoff_base_ms, p_backoff_cap_ms, p_jitter)
             WITH ORDINALITY AS x(name, handler, config, timeout, retryable, max_attempts, base, cap, jitter, ord)
       CROSS JOIN LATERAL (SELECT CASE WHEN v_shared THEN x.ord ELSE (t.ord - 1) * v_steps + x.ord END::int AS i) k
        LEFT JOIN (SELECT e.to_name, count(*)::int AS n FROM unnest(p_edge_to) AS e(to_name) GROUP BY e.to_name) p
          ON p.to_name = x.name
       WHERE t.id = ANY (v_new)
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

  RETURN QUERY
  SELECT CASE WHEN n.id IS NOT NULL THEN n.id
              ELSE (SELECT t.id FROM tasker_tasks t WHERE t.identity_key = x.identity_key) END,
         n.id IS NOT NULL
    FROM unnest(p_contexts, p_identity_keys) WITH ORDINALITY AS x(context, identity_key, ord)
    LEFT JOIN unnest(v_new) AS n(id) ON n.id = v_ids[x.ord]
   WHERE x.ord <= v_n
   ORDER BY x.ord;
END $$;

-- Version 9's signature (older callers): every step on 'default', priority
-- 0, no limit, at once. One rule, in tasker_create_tasks_v2.
CREATE OR REPLACE FUNCTION tasker_create_tasks(
  p_namespace text, p_name text, p_version text, p_definition jsonb, p_contexts bytea[], p_identity_keys text[],
  p_step_names text[], p_handlers text[], p_handler_configs bytea[], p_timeouts_ms int[],
  p_retryable boolean[], p_max_attempts int[], p_backoff_base_ms int[], p_backoff_cap_ms int[],
  p_jitter float8[], p_edge_from text[], p_edge_to text[])
RETURNS TABLE (task_id bigint, created boolean) LANGUAGE sql AS $$
  SELECT c.task_id, c.created
    FROM tasker_create_tasks_v2(p_namespace, p_name, p_version, p_definition, p_contexts, p_identity_keys,
                                p_step_names, p_handlers, p_handler_configs, p_timeouts_ms, p_retryable,
                                p_max_attempts, p_backoff_base_ms, p_backoff_cap_ms, p_jitter, p_edge_from, p_edge_to,
                                NULL, NULL, NULL, NULL, NULL, NULL) c
$$;

-- ---------------------------------------------------------------------------
-- Claiming.

-- Fewer than p_limit steps with concurrency key p_key in flight now. The
-- claim asks it only of steps with a key, so a step whose key is at its
-- limit is not a candidate (the count is made again under the lock).
CREATE FUNCTION tasker_key_has_room(p_key text, p_limit int) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT count(*) < p_limit FROM tasker_workflow_steps f
   WHERE f.concurrency_key = p_key AND f.state IN ('enqueued', 'in_progress')
$$;

-- Ready steps claimed to p_state as tasker_claim (version 9) does, from the
-- queues p_queues only, each up to p_queue_room of it (what the workers
-- serving it have free), p_limit in all, with version 8's suspect budget:
-- up to p_suspect_limit suspects first (lost_attempts >= p_suspect_lost),
-- then other ready steps in claim order (tasker_claim_order, then id).
-- Concurrency limits: a queue of p_limited_queues has at most
-- p_queue_limits of its steps in flight; steps with a concurrency_key at
-- most their concurrency_limit in flight per key. When a candidate is in a
-- limited queue or has a key, the claim takes the advisory lock
-- 0x74636f6e63 ("tconc") for the rest of its transaction and counts what
-- is in flight in a statement of its own (so it sees every claim committed
-- under the lock before it); without limits it takes no lock. Returns the
-- claimed steps as tasker_claim does, and their queue, in claim order
-- (suspects first), the order the loop sends them in. p_task_id (NULL:
-- any) claims the steps of that task only (the RSpec inline runner).
CREATE FUNCTION tasker_claim_queued(p_owner text, p_lease_ms int, p_state text, p_suspect_lost int,
                                    p_suspect_limit int, p_limit int, p_queues text[], p_queue_room int[],
                                    p_limited_queues text[], p_queue_limits int[], p_task_id bigint DEFAULT NULL)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int, queue text)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_ids bigint[];
  v_limited boolean;
  v_limited_queues text[] := coalesce(p_limited_queues, '{}'::text[]);
BEGIN
  IF p_state NOT IN ('enqueued', 'in_progress') THEN
    RAISE EXCEPTION 'tasker_claim_queued: a claim moves steps to enqueued or in_progress, not %', p_state;
  END IF;
  IF coalesce(p_limit, 0) <= 0 OR coalesce(cardinality(p_queues), 0) = 0 THEN
    RETURN;
  END IF;

  -- Candidates, locked: suspects, then per queue in claim order. A step
  -- ready no later than now has a claim order no later than now + 100 s
  -- (priority >= -100): that bound stops the index scan before the steps
  -- scheduled for later. A limited queue's room is at most what its limit
  -- leaves now, and a full one is not read: its candidates would all be
  -- dropped under the lock, and would have taken the places in p_limit of
  -- other queues' steps (counted again under the lock below).
  WITH room AS (
    SELECT r.name, r.room FROM (
      SELECT q.name, CASE WHEN ql.lim IS NULL THEN q.room
                          ELSE least(q.room, ql.lim - (SELECT count(*) FROM tasker_workflow_steps f
                                                        WHERE f.queue = q.name
                                                          AND f.state IN ('enqueued', 'in_progress'))) END AS room
        FROM unnest(p_queues, p_queue_room) AS q(name, room)
        LEFT JOIN LATERAL (SELECT min(l.lim) AS lim FROM unnest(p_limited_queues, p_queue_limits) AS l(queue, lim)
                            WHERE l.queue = q.name) ql ON true
       WHERE q.room > 0) r
     WHERE r.room > 0
  ), suspect AS (
    SELECT s.id, s.concurrency_key IS NOT NULL OR s.queue = ANY (v_limited_queues) AS limited
      FROM tasker_workflow_steps s
      JOIN tasker_tasks t ON t.id = s.task_id
     WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.next_attempt_at <= now()
       AND s.lost_attempts >= p_suspect_lost AND t.state IN ('pending', 'in_progress')
       AND s.queue IN (SELECT room.name FROM room) AND (p_task_id IS NULL OR s.task_id = p_task_id)
       AND CASE WHEN s.concurrency_key IS NULL THEN true ELSE tasker_key_has_room(s.concurrency_key, s.concurrency_limit) END
     ORDER BY s.next_attempt_at, s.id
     LIMIT greatest(least(coalesce(p_suspect_limit, 0), p_limit), 0)
     FOR UPDATE OF s SKIP LOCKED
  ), plain AS (
    SELECT c.* FROM room CROSS JOIN LATERAL (
      SELECT s.id, s.concurrency_key IS NOT NULL OR s.queue = ANY (v_limited_queues) AS limited,
             tasker_claim_order(s.next_attempt_at, s.priority) AS ord
        FROM tasker_workflow_steps s
        JOIN tasker_tasks t ON t.id = s.task_id
       WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.queue = room.name
         AND tasker_claim_order(s.next_attempt_at, s.priority) <= now() + interval '100 seconds'
         AND s.next_attempt_at <= now()
         AND (p_suspect_lost IS NULL OR s.lost_attempts < p_suspect_lost) AND t.state IN ('pending', 'in_progress')
         AND (p_task_id IS NULL OR s.task_id = p_task_id)
         AND CASE WHEN s.concurrency_key IS NULL THEN true ELSE tasker_key_has_room(s.concurrency_key, s.concurrency_limit) END
       ORDER BY tasker_claim_order(s.next_attempt_at, s.priority), s.id
       LIMIT least(room.room, p_limit)
       FOR UPDATE OF s SKIP LOCKED
    ) c
  )
  SELECT array_agg(x.id ORDER BY x.grp, x.ord, x.id),
         coalesce(bool_or(x.limited), false)
    INTO v_ids, v_limited
    FROM (SELECT s.id, 0 AS grp, NULL::timestamptz AS ord, s.limited FROM suspect s
          UNION ALL
          SELECT p.id, 1, p.ord, p.limited FROM plain p
           ORDER BY 2, 3, 1
           LIMIT p_limit) x;

  IF v_ids IS NULL THEN
    RETURN;
  END IF;

  IF v_limited THEN
    PERFORM pg_advisory_xact_lock(x'74636f6e63'::bigint);
    -- A statement of its own, after the lock: in flight now. The candidates
    -- are pending (locked by this claim), so not counted.
    SELECT array_agg(c.id ORDER BY c.pos) INTO v_ids
      FROM (SELECT s.id, s.queue, s.concurrency_key AS key, s.concurrency_limit AS key_limit, s.pos,
                   row_number() OVER (PARTITION BY s.queue ORDER BY s.pos) AS qn,
                   row_number() OVER (PARTITION BY s.concurrency_key ORDER BY s.pos) AS kn
              FROM (SELECT f.id, f.queue, f.concurrency_key, f.concurrency_limit, array_position(v_ids, f.id) AS pos
                      FROM tasker_workflow_steps f WHERE f.id = ANY (v_ids)) s) c
      LEFT JOIN unnest(p_limited_queues, p_queue_limits) AS ql(queue, lim) ON ql.queue = c.queue
      LEFT JOIN LATERAL (SELECT count(*) AS n FROM tasker_workflow_steps s
                          WHERE ql.queue IS NOT NULL AND s.queue = c.queue
                            AND s.state IN ('enqueued', 'in_progress')) qf ON true
      LEFT JOIN LATERAL (SELECT count(*) AS n FROM tasker_workflow_steps s
                          WHERE c.key IS NOT NULL AND s.concurrency_key = c.key
                            AND s.state IN ('enqueued', 'in_progress')) kf ON true
     WHERE (ql.queue IS NULL OR c.qn <= ql.lim - qf.n)
       AND (c.key IS NULL OR c.kn <= c.key_limit - kf.n);
    IF v_ids IS NULL THEN
      RETURN;
    END IF;
  END IF;

  RETURN QUERY
  WITH claimed AS (
    UPDATE tasker_workflow_steps s
       SET state = p_state, attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
     WHERE s.id = ANY (v_ids)
    RETURNING s.id, s.task_id, s.name, s.handler, s.handler_config, s.attempts, s.timeout_ms, s.lost_attempts,
              s.queue
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
         coalesce(d.names, '{}'::text[]), coalesce(d.outputs, '{}'::bytea[]), c.lost_attempts, c.queue
    FROM claimed c
    JOIN tasker_tasks t ON t.id = c.task_id
    LEFT JOIN LATERAL (
      SELECT array_agg(p.name ORDER BY p.name) AS names, array_agg(p.output ORDER BY p.name) AS outputs
        FROM tasker_workflow_step_edges e
        JOIN tasker_workflow_steps p ON p.id = e.from_step_id
       WHERE e.to_step_id = c.id
    ) d ON true
    JOIN unnest(v_ids) WITH ORDINALITY AS o(id, pos) ON o.id = c.id
   ORDER BY o.pos;  -- claim order: suspects, then the others as chosen
END $$;

-- The orchestration loop's claim (version 4): tasker_claim_queued to
-- in_progress.
CREATE FUNCTION tasker_claim_steps_v4(p_owner text, p_lease_ms int, p_suspect_lost int, p_suspect_limit int,
                                      p_limit int, p_queues text[], p_queue_room int[], p_limited_queues text[],
                                      p_queue_limits int[])
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int, queue text)
LANGUAGE sql AS $$
  SELECT * FROM tasker_claim_queued(p_owner, p_lease_ms, 'in_progress', p_suspect_lost, p_suspect_limit, p_limit,
                                    p_queues, p_queue_room, p_limited_queues, p_queue_limits)
$$;

-- Versions 1 to 3 (older orchestrators, whose workers know no queues):
-- the queue 'default' only, chosen in claim order and returned in id order
-- as before. One rule, tasker_claim_queued.
CREATE OR REPLACE FUNCTION tasker_claim(p_owner text, p_limit int, p_lease_ms int, p_state text, p_suspect_lost int,
                                        p_suspect_limit int)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int)
LANGUAGE plpgsql AS $$
BEGIN
  RETURN QUERY
  SELECT c.step_id, c.task_id, c.step_name, c.handler, c.handler_config, c.attempt, c.timeout_ms, c.context,
         c.dep_names, c.dep_outputs, c.lost_attempts
    FROM tasker_claim_queued(p_owner, p_lease_ms, p_state, p_suspect_lost, p_suspect_limit, p_limit,
                             ARRAY['default'], ARRAY[p_limit], NULL, NULL) c
   ORDER BY c.step_id;
END $$;

-- Claimed steps back to pending without a lost attempt, logged with
-- p_reason: ready again after p_delay_ms, or (NULL) keeping their
-- next_attempt_at (no later than the claim), so a step sent back keeps its
-- place in claim order instead of queueing behind the steps that became
-- ready since. Only steps still in flight at the attempt given. Returns
-- each step moved and its handler; notifies when they are ready at once.
CREATE FUNCTION tasker_put_back_steps(p_step_ids bigint[], p_attempts int[], p_delay_ms int, p_reason text)
RETURNS TABLE (step_id bigint, handler text)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
  v_ids bigint[];
  v_handlers text[];
BEGIN
  WITH target AS (
    SELECT s.id, s.state AS old_state FROM tasker_workflow_steps s
      JOIN unnest(p_step_ids, p_attempts) AS x(id, attempt) ON s.id = x.id AND s.attempts = x.attempt
     WHERE s.state IN ('enqueued', 'in_progress')
     ORDER BY s.id
       FOR UPDATE OF s
  ), moved AS (
    UPDATE tasker_workflow_steps s
       SET state = 'pending',
           next_attempt_at = CASE WHEN p_delay_ms IS NULL THEN least(s.next_attempt_at, now())
                                  ELSE now() + greatest(p_delay_ms, 0) * interval '1 millisecond' END,
           claimed_by = NULL, claim_deadline = NULL, updated_at = now()
      FROM target WHERE s.id = target.id
    RETURNING s.id, s.task_id, s.attempts, s.handler, target.old_state
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
    SELECT m.id, m.task_id, m.old_state, 'pending', m.attempts, p_reason FROM moved m
  )
  SELECT array_agg(m.id ORDER BY m.id), array_agg(m.handler ORDER BY m.id) INTO v_ids, v_handlers FROM moved m;
  IF v_ids IS NOT NULL AND p_delay_ms IS NULL THEN
    PERFORM pg_notify('tasker_steps_ready', '');
  END IF;
  RETURN QUERY SELECT x.id, x.handler FROM unnest(v_ids, v_handlers) AS x(id, handler);
END $$;

-- Claimed steps the orchestrator did not send (version 1's signature),
-- reason 'released'. Returns how many.
CREATE OR REPLACE FUNCTION tasker_release_steps(p_step_ids bigint[], p_attempts int[]) RETURNS int
LANGUAGE sql AS $$
  SELECT count(*)::int FROM tasker_put_back_steps(p_step_ids, p_attempts, NULL, 'released')
$$;

-- A claimed step its worker refused for want of its handler
-- (docs/protocol.md 4.7, unknown_handler): back to pending, not a lost
-- attempt, ready again after p_delay_ms (so a step no worker can run yet
-- is not claimed and sent back in a loop). Logged with reason
-- 'unknown_handler'. Returns each step moved and its handler.
CREATE FUNCTION tasker_defer_steps(p_step_ids bigint[], p_attempts int[], p_delay_ms int)
RETURNS TABLE (step_id bigint, handler text)
LANGUAGE sql AS $$
  SELECT * FROM tasker_put_back_steps(p_step_ids, p_attempts, greatest(coalesce(p_delay_ms, 0), 0), 'unknown_handler')
$$;

-- ---------------------------------------------------------------------------
-- Workers: the queues each serves (from its heartbeats), for tasker status.

ALTER TABLE tasker_workers ADD COLUMN queues text[] NOT NULL DEFAULT '{default}';

-- As in version 4, with each worker's queues (p_queues: one element per
-- worker, its queue names joined by commas; queue names have none).
CREATE FUNCTION tasker_upsert_workers(p_owner text, p_ids text[], p_hosts text[], p_pids int[],
                                      p_capacities int[], p_in_flight int[], p_heartbeats float8[],
                                      p_connects int[], p_disconnects int[], p_last_events text[],
                                      p_last_event_ats float8[], p_queues text[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_n int;
BEGIN
  v_n := tasker_upsert_workers(p_owner, p_ids, p_hosts, p_pids, p_capacities, p_in_flight, p_heartbeats,
                               p_connects, p_disconnects, p_last_events, p_last_event_ats);
  UPDATE tasker_workers w SET queues = string_to_array(x.queues, ',')
    FROM unnest(p_ids, p_queues) AS x(id, queues)
   WHERE w.id = x.id AND x.queues IS NOT NULL AND w.queues IS DISTINCT FROM string_to_array(x.queues, ',');
  RETURN v_n;
END $$;
