-- tasker_core schema, version 6: retention. Finished tasks (complete,
-- error, cancelled) are deleted after retention.finished_after by
-- TaskerCore::Retention, one small batch per call of
-- tasker_delete_finished_tasks, each its own short transaction.

-- Finished tasks by finish time: a batch reads only the oldest rows.
CREATE INDEX tasker_tasks_finished ON tasker_tasks (finished_at, id)
  WHERE state IN ('complete', 'error', 'cancelled');

-- Deletes up to p_limit tasks finished before p_before, oldest first, and
-- everything that belongs to them: the statement-level delete triggers of
-- version 1 remove their steps, then the steps' edges and histories, and
-- the tasks' histories. A task another transaction has locked (a retry or
-- a result being applied) is skipped, never waited for; it goes in a later
-- batch if still finished. Returns the tasks and steps deleted.
CREATE FUNCTION tasker_delete_finished_tasks(p_before timestamptz, p_limit int)
RETURNS TABLE (tasks int, steps int) LANGUAGE sql AS $$
  WITH doomed AS (
    SELECT id FROM tasker_tasks
     WHERE state IN ('complete', 'error', 'cancelled') AND finished_at < p_before
     ORDER BY finished_at, id
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  ), gone AS (
    DELETE FROM tasker_tasks t USING doomed WHERE t.id = doomed.id
    RETURNING t.step_count
  )
  SELECT count(*)::int, coalesce(sum(step_count), 0)::int FROM gone;
$$;
