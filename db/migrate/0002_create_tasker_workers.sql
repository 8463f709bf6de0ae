-- tasker_core schema, version 2: the workers an orchestrator sees, for
-- `tasker status`. Upserted by the orchestration loop about once a second
-- in one statement; workers it no longer sees stay as rows with
-- connected = false.

CREATE TABLE tasker_workers (
  id                text PRIMARY KEY,
  owner             text NOT NULL,
  host              text,
  pid               int,
  capacity          int NOT NULL DEFAULT 0,
  in_flight         int NOT NULL DEFAULT 0,
  last_heartbeat_at timestamptz,
  connected         boolean NOT NULL DEFAULT true,
  updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasker_workers_owner ON tasker_workers (owner) WHERE connected;

-- The live workers of one orchestrator (parallel arrays; heartbeat times
-- in epoch seconds). Its other rows become connected = false. Returns how
-- many rows are connected for that owner now.
CREATE FUNCTION tasker_upsert_workers(p_owner text, p_ids text[], p_hosts text[], p_pids int[],
                                      p_capacities int[], p_in_flight int[], p_heartbeats float8[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_n int;
BEGIN
  INSERT INTO tasker_workers AS w (id, owner, host, pid, capacity, in_flight, last_heartbeat_at, connected,
                                   updated_at)
  SELECT x.id, p_owner, x.host, x.pid, x.capacity, x.in_flight, to_timestamp(x.hb), true, now()
    FROM unnest(p_ids, p_hosts, p_pids, p_capacities, p_in_flight, p_heartbeats)
         AS x(id, host, pid, capacity, in_flight, hb)
  ON CONFLICT (id) DO UPDATE
    SET owner = EXCLUDED.owner, host = EXCLUDED.host, pid = EXCLUDED.pid, capacity = EXCLUDED.capacity,
        in_flight = EXCLUDED.in_flight, last_heartbeat_at = EXCLUDED.last_heartbeat_at, connected = true,
        updated_at = now();
  UPDATE tasker_workers SET connected = false, in_flight = 0, updated_at = now()
   WHERE owner = p_owner AND connected AND NOT (id = ANY (coalesce(p_ids, '{}'::text[])));
  SELECT count(*) INTO v_n FROM tasker_workers WHERE owner = p_owner AND connected;
  RETURN v_n;
END $$;
