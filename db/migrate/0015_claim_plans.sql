-- tasker_core schema, version 15: the claim's choice of steps planned once
-- per session too, and an apply whose cost grows with its size, not its
-- square.
--
-- Version 14 left the claim's reads planned on every call: pg_stat_statements
-- with track_planning (bench/store_bench.rb drain_v2, claims of 50) put
-- 300 ms of planning against 185 ms of execution for 20,000 steps in the
-- queues' room and the ready steps' choice, about 15 µs of the database's
-- CPU per step. Both are planned generically now, with index scans only
-- (sequential and bitmap scans off): the ready steps are read from
-- tasker_workflow_steps_queue_ready in claim order whatever the tables
-- looked like when the plan was made (the only other way to the order is a
-- whole index and a sort), and each candidate's task is read by its id in a
-- subquery (as a join, a plan made on empty tables read the unfinished
-- tasks' index whole once per candidate). The suspects (a partial index
-- whose predicate needs the threshold as a constant) and a claim for one
-- task (p_task_id, the rspec inline mode: its steps are found by task) stay
-- planned per call. The claim's writes read what they did in version 14,
-- without the two nested loops that rescanned one side once per row of the
-- other (the claimed rows joined to the claim's ids again for their order,
-- the tasks to the claimed rows), and the limits' recheck counts each
-- limited queue's steps in flight once, not once per candidate.
--
-- JIT compilation is off in these functions: a generic plan's estimates do
-- not know the arrays' sizes nor a LIMIT's, and the ready steps' estimated
-- cost passed jit_above_cost, so every call compiled its plan (300 ms, for a
-- statement that runs in under one). None of the hot path's statements
-- reads enough rows for JIT to pay.
--
-- What the functions do is unchanged.

ALTER FUNCTION tasker_release_children(bigint[]) SET jit = off;
ALTER FUNCTION tasker_settle_tasks(bigint[], bigint[]) SET jit = off;

-- The old states come from a second reference to the steps table, joined
-- by id like the first: a plan has no way to reach either but by the ids
-- in hand. In version 14 they came from a CTE joined to the results, and a
-- generic plan made on emptied tables joined the two by a nested loop that
-- scanned the CTE once per result: quadratic in the call's size (an apply of
-- 300 results took 360 ms in bench/e2e_bench.rb, and the results that
-- waited for it made the next call larger still).
CREATE OR REPLACE FUNCTION tasker_apply_results(p_step_ids bigint[], p_attempts int[], p_success boolean[],
                                                p_outputs bytea[], p_errors bytea[], p_retryable boolean[],
                                                p_retry_after_ms int[])
RETURNS TABLE (applied int, stale int)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_indexscan = off
SET enable_indexonlyscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
  v_total int := coalesce(cardinality(p_step_ids), 0);
  -- In a variable, not a literal: so that no plan of the update reads the
  -- in-flight partial index whole (its predicate is these states) instead
  -- of the rows by id.
  v_in_flight text[] := '{enqueued,in_progress}';
  v_applied int;
  v_done bigint[];
  v_done_tasks bigint[];
  v_tasks bigint[];
BEGIN
  -- success: complete with its output. failure: failures + 1; back to
  -- pending after a backoff while retryable and attempts remain (the
  -- handler's retry_after wins over the exponential backoff), else error.
  WITH r AS (
    SELECT x.id, x.attempt, coalesce(x.success, false) AS success, x.output, x.error,
           coalesce(x.retryable, true) AS retryable, x.retry_after_ms
      FROM (SELECT DISTINCT ON (u.id) u.*
              FROM unnest(p_step_ids, p_attempts, p_success, p_outputs, p_errors, p_retryable, p_retry_after_ms)
                   WITH ORDINALITY AS u(id, attempt, success, output, error, retryable, retry_after_ms, ord)
             ORDER BY u.id, u.ord) x
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
      FROM r, tasker_workflow_steps o -- o: the row as the statement found it, for its old state
     WHERE s.id = r.id AND o.id = r.id AND s.attempts = r.attempt
       AND s.state = ANY (v_in_flight)
    RETURNING s.id, s.task_id, s.state, r.attempt, o.state AS old_state, r.success
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason)
    SELECT upd.id, upd.task_id, upd.old_state, upd.state, upd.attempt,
           CASE WHEN upd.success THEN 'result' WHEN upd.state = 'pending' THEN 'retry' ELSE 'failed' END
      FROM upd
  )
  SELECT count(*),
         array_agg(upd.id) FILTER (WHERE upd.state = 'complete'),
         array_agg(upd.task_id) FILTER (WHERE upd.state = 'complete'),
         array_agg(DISTINCT upd.task_id)
    INTO v_applied, v_done, v_done_tasks, v_tasks FROM upd;

  IF v_applied = 0 THEN
    RETURN QUERY SELECT 0, v_total;
    RETURN;
  END IF;
  IF v_done IS NOT NULL THEN
    PERFORM tasker_release_children(v_done);
  END IF;
  PERFORM tasker_settle_tasks(v_tasks, coalesce(v_done_tasks, '{}'::bigint[]));

  RETURN QUERY SELECT v_applied, v_total - v_applied;
END $$;

CREATE OR REPLACE FUNCTION tasker_claim_queued(p_owner text, p_lease_ms int, p_state text, p_suspect_lost int,
                                               p_suspect_limit int, p_limit int, p_queues text[], p_queue_room int[],
                                               p_limited_queues text[], p_queue_limits int[],
                                               p_task_id bigint DEFAULT NULL)
RETURNS TABLE (step_id bigint, task_id bigint, step_name text, handler text, handler_config bytea,
               attempt int, timeout_ms int, context bytea, dep_names text[], dep_outputs bytea[],
               lost_attempts int, queue text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
SET enable_indexscan = on SET enable_indexonlyscan = on SET jit = off AS $$
#variable_conflict use_column
DECLARE
  v_limited_queues text[] := coalesce(p_limited_queues, '{}'::text[]);
  v_names text[];
  v_rooms int[];
  v_ids bigint[] := '{}';
  v_limited boolean := false;
  v_plain bigint[];
  v_plain_limited boolean;
  v_left int;
  -- In a variable, not a literal: so that no plan of the claim reads the
  -- unfinished tasks' partial index whole (its predicate holds this
  -- state) and joins the claimed steps' tasks to it row by row.
  v_pending text := 'pending';
BEGIN
  IF p_state NOT IN ('enqueued', 'in_progress') THEN
    RAISE EXCEPTION 'tasker_claim_queued: a claim moves steps to enqueued or in_progress, not %', p_state;
  END IF;
  IF coalesce(p_limit, 0) <= 0 OR coalesce(cardinality(p_queues), 0) = 0 THEN
    RETURN;
  END IF;

  -- The queues with room: a limited queue's room is at most what its limit
  -- leaves now, and a full one is not read: its candidates would all be
  -- dropped under the lock, and would have taken the places in p_limit of
  -- other queues' steps (counted again under the lock below).
  SELECT array_agg(r.name ORDER BY r.ord), array_agg(r.room ORDER BY r.ord) INTO v_names, v_rooms
    FROM (SELECT q.name, q.ord,
                 CASE WHEN ql.lim IS NULL THEN q.room
                      ELSE least(q.room, ql.lim - (SELECT count(*) FROM tasker_workflow_steps f
                                                    WHERE f.queue = q.name
                                                      AND f.state IN ('enqueued', 'in_progress'))) END AS room
            FROM unnest(p_queues, p_queue_room) WITH ORDINALITY AS q(name, room, ord)
            LEFT JOIN LATERAL (SELECT min(l.lim) AS lim FROM unnest(p_limited_queues, p_queue_limits) AS l(queue, lim)
                                WHERE l.queue = q.name) ql ON true
           WHERE q.room > 0) r
   WHERE r.room > 0;
  IF v_names IS NULL THEN
    RETURN;
  END IF;

  -- Suspects first, up to p_suspect_limit, locked, in id order. Planned for
  -- the threshold given, so that the suspects' partial index serves it.
  IF coalesce(p_suspect_limit, 0) > 0 AND p_suspect_lost IS NOT NULL THEN
    SET LOCAL plan_cache_mode = force_custom_plan;
    SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}'), coalesce(bool_or(x.limited), false)
      INTO v_ids, v_limited
      FROM (SELECT s.id, s.concurrency_key IS NOT NULL OR s.queue = ANY (v_limited_queues) AS limited
              FROM tasker_workflow_steps s
              JOIN tasker_tasks t ON t.id = s.task_id
             WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.next_attempt_at <= now()
               AND s.lost_attempts >= p_suspect_lost AND t.state IN ('pending', 'in_progress')
               AND s.queue = ANY (v_names) AND (p_task_id IS NULL OR s.task_id = p_task_id)
               AND CASE WHEN s.concurrency_key IS NULL THEN true
                        ELSE tasker_key_has_room(s.concurrency_key, s.concurrency_limit) END
             ORDER BY s.next_attempt_at, s.id
             LIMIT least(p_suspect_limit, p_limit)
               FOR UPDATE OF s SKIP LOCKED) x;
    SET LOCAL plan_cache_mode = force_generic_plan;
  END IF;

  -- Then the other ready steps, per queue in claim order (a step ready no
  -- later than now has a claim order no later than now + 100 s, priority
  -- >= -100: that bound stops the index scan before the steps scheduled for
  -- later), locked, the first in claim order across queues up to p_limit.
  v_left := p_limit - cardinality(v_ids);
  IF v_left > 0 THEN
    IF p_task_id IS NOT NULL THEN
      SET LOCAL plan_cache_mode = force_custom_plan;
    END IF;
    SELECT array_agg(x.id ORDER BY x.ord, x.id), coalesce(bool_or(x.limited), false)
      INTO v_plain, v_plain_limited
      FROM (SELECT c.* FROM unnest(v_names, v_rooms) AS room(name, room) CROSS JOIN LATERAL (
              SELECT s.id, s.concurrency_key IS NOT NULL OR s.queue = ANY (v_limited_queues) AS limited,
                     tasker_claim_order(s.next_attempt_at, s.priority) AS ord
                FROM tasker_workflow_steps s
               WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.queue = room.name
                 AND tasker_claim_order(s.next_attempt_at, s.priority) <= now() + interval '100 seconds'
                 AND s.next_attempt_at <= now()
                 AND (p_suspect_lost IS NULL OR s.lost_attempts < p_suspect_lost)
                 AND (SELECT t.state FROM tasker_tasks t WHERE t.id = s.task_id) IN ('pending', 'in_progress')
                 AND (p_task_id IS NULL OR s.task_id = p_task_id)
                 AND CASE WHEN s.concurrency_key IS NULL THEN true
                          ELSE tasker_key_has_room(s.concurrency_key, s.concurrency_limit) END
               ORDER BY tasker_claim_order(s.next_attempt_at, s.priority), s.id
               LIMIT least(room.room, v_left)
                 FOR UPDATE OF s SKIP LOCKED) c
             ORDER BY c.ord, c.id
             LIMIT v_left) x;
    IF v_plain IS NOT NULL THEN
      v_ids := v_ids || v_plain;
      v_limited := v_limited OR v_plain_limited;
    END IF;
  END IF;

  IF cardinality(v_ids) = 0 THEN
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
      -- each limited queue's steps in flight, counted once (not once per
      -- candidate: no index has the queue of the steps in flight)
      LEFT JOIN (SELECT s.queue, count(*) AS n FROM tasker_workflow_steps s
                  WHERE s.queue = ANY (v_limited_queues) AND s.state IN ('enqueued', 'in_progress')
                  GROUP BY s.queue) qf ON qf.queue = c.queue
      LEFT JOIN LATERAL (SELECT count(*) AS n FROM tasker_workflow_steps s
                          WHERE c.key IS NOT NULL AND s.concurrency_key = c.key
                            AND s.state IN ('enqueued', 'in_progress')) kf ON true
     WHERE (ql.queue IS NULL OR c.qn <= ql.lim - coalesce(qf.n, 0))
       AND (c.key IS NULL OR c.kn <= c.key_limit - kf.n);
    IF v_ids IS NULL THEN
      RETURN;
    END IF;
  END IF;

  -- The claim, as in version 11; each table through the ids in hand, with
  -- the plan the writes keep (see the header). The claimed rows carry their
  -- place in v_ids, and the tasks are joined to the tasks claimed: nothing
  -- is scanned once per row (version 14 joined the claimed rows to v_ids
  -- again, and the tasks to the claimed rows, by nested loops that rescanned
  -- one side per row of the other).
  SET LOCAL plan_cache_mode = force_generic_plan;
  SET LOCAL enable_bitmapscan = on;
  SET LOCAL enable_indexscan = off;
  SET LOCAL enable_indexonlyscan = off;
  RETURN QUERY
  WITH claimed AS (
    UPDATE tasker_workflow_steps s
       SET state = p_state, attempts = s.attempts + 1, claimed_by = p_owner,
           claim_deadline = now() + (s.timeout_ms + p_lease_ms) * interval '1 millisecond',
           last_attempt_at = now(), updated_at = now()
      FROM unnest(v_ids) WITH ORDINALITY AS o(id, pos)
     WHERE s.id = o.id
    RETURNING s.id, s.task_id, s.name, s.handler, s.handler_config, s.attempts, s.timeout_ms, s.lost_attempts,
              s.queue, o.pos
  ), logged AS (
    INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
    SELECT c.id, c.task_id, 'pending', p_state, c.attempts, p_owner, 'claimed' FROM claimed c
  ), started AS (
    UPDATE tasker_tasks t SET state = 'in_progress', updated_at = now()
      FROM (SELECT DISTINCT c.task_id FROM claimed c) ct
     WHERE t.id = ct.task_id AND t.state = v_pending
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
   ORDER BY c.pos;  -- claim order: suspects, then the others as chosen
END $$;
