-- tasker_core schema, version 6: what the dashboard (TaskerCore::Web) reads.
--
-- Steps completed per minute over the last hour come from the step
-- transitions, an append-only log whose rows arrive in created_at order: a
-- BRIN index (one summary per 128 pages, a few kB for millions of rows)
-- lets that query read the last hour's pages instead of the whole log, and
-- costs the writers almost nothing, unlike a B-tree entry per transition.
-- bench/web_bench.rb measures the pages with and without it.
CREATE INDEX tasker_workflow_step_transitions_created_brin
  ON tasker_workflow_step_transitions USING brin (created_at) WITH (autosummarize = on);

-- The step counters of /metrics read the transitions logged since their last
-- read, by id range (ids are drawn in insertion order, so a BRIN summary of
-- each block range's ids is as tight as the created_at one).
CREATE INDEX tasker_workflow_step_transitions_id_brin
  ON tasker_workflow_step_transitions USING brin (id) WITH (autosummarize = on);

-- Tasks in error, counted by /metrics and the dashboard (pending and
-- in-progress ones have tasker_tasks_unfinished); few rows, and no HOT update
-- is lost: state is already in tasker_tasks_unfinished's predicate.
CREATE INDEX tasker_tasks_error ON tasker_tasks (id) WHERE state = 'error';
