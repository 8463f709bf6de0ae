-- tasker_core schema, version 16: the claim order computed inline.
--
-- tasker_claim_order (version 11) is the expression of the ready steps'
-- index and the claim's order. It is declared IMMUTABLE, but its body
-- subtracted an interval from a timestamptz, an operator PostgreSQL marks
-- STABLE (it reads the time zone for intervals of days or months), so the
-- planner never inlined it: each use was a call of a SQL function, run by
-- its own executor, twice per step (the index entry when a step is written
-- ready, and each step the claim reads). pg_stat_statements (track = all)
-- counted 40,000 calls for 20,000 steps run.
--
-- The body now does the same arithmetic on timestamps at UTC (an offset of
-- zero: no time zone name to look up), with operators that are immutable,
-- and is inlined wherever it is used. For an interval of seconds the time
-- zone plays no part, so every value is the one version 11 computed: the
-- index built with it stays valid and is not rebuilt.
--
-- A session keeps an index's expressions as it first read them, simplified
-- (here: the function call, then not inlinable), and replacing a function
-- does not refresh them. A session open while this runs (an orchestrator's)
-- would plan its claims with the inlined expression against the index's
-- cached call, match neither, and read and sort every ready step of a
-- queue on each claim. Setting and resetting a storage parameter of the
-- index changes its catalog row, and every session reads the index afresh
-- at this commit (the lock taken blocks neither reads nor writes of the
-- steps).
CREATE OR REPLACE FUNCTION tasker_claim_order(p_next_attempt_at timestamptz, p_priority int) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ((p_next_attempt_at AT TIME ZONE interval '0') - p_priority * interval '1 second') AT TIME ZONE interval '0'
$$;

ALTER INDEX tasker_workflow_steps_queue_ready SET (fillfactor = 90);
ALTER INDEX tasker_workflow_steps_queue_ready RESET (fillfactor);
