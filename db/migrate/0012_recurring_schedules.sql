-- tasker_core schema, version 12: recurring tasks (TaskerCore::Recurring).
--
-- One row per recurring schedule (the `recurring:` entries of the
-- configuration, by name): the latest tick an orchestrator created a task
-- for, and that task. Each tick's task is created with the identity_key
-- "recurring:<name>:<tick in ISO 8601 UTC>", so two orchestrators creating
-- the same tick get one task (tasker_tasks.identity_key is unique); this row
-- is where a restarted orchestrator with `backfill: true` resumes from, and
-- what `tasker status` and the dashboard show as the last tick. It is
-- written once per tick that is due, never while a schedule waits, and only
-- ever moves forward.
CREATE TABLE tasker_recurring_schedules (
  name          text PRIMARY KEY,
  last_tick_at  timestamptz NOT NULL,
  last_task_id  bigint,
  updated_at    timestamptz NOT NULL DEFAULT now()
);
