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
