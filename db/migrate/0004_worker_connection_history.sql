-- tasker_core schema, version 4: each worker's connection history, from
-- the optional "connection" of its heartbeats (totals of its socket
-- monitor's connected/disconnected events on both sockets, and the latest
-- event). Workers that do not send it keep zeros and NULLs.

ALTER TABLE tasker_workers
  ADD COLUMN connects                 int NOT NULL DEFAULT 0,
  ADD COLUMN disconnects              int NOT NULL DEFAULT 0,
  ADD COLUMN last_connection_event    text,
  ADD COLUMN last_connection_event_at timestamptz;

DROP FUNCTION tasker_upsert_workers(text, text[], text[], int[], int[], int[], float8[]);

-- As in version 2, with four more parallel arrays (event times in epoch
-- seconds; NULL elements when a worker did not say).
CREATE OR REPLACE FUNCTION tasker_upsert_workers(p_owner text, p_ids text[], p_hosts text[], p_pids int[],
                                                 p_capacities int[], p_in_flight int[], p_heartbeats float8[],
                                                 p_connects int[], p_disconnects int[], p_last_events text[],
                                                 p_last_event_ats float8[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_n int;
BEGIN
  INSERT INTO tasker_workers AS w (id, owner, host, pid, capacity, in_flight, last_heartbeat_at, connected,
                                   connects, disconnects, last_connection_event, last_connection_event_at,
                                   updated_at)
  SELECT x.id, p_owner, x.host, x.pid, x.capacity, x.in_flight, to_timestamp(x.hb), true,
         coalesce(x.connects, 0), coalesce(x.disconnects, 0), x.last_event, to_timestamp(x.last_event_at), now()
    FROM unnest(p_ids, p_hosts, p_pids, p_capacities, p_in_flight, p_heartbeats,
                p_connects, p_disconnects, p_last_events, p_last_event_ats)
         AS x(id, host, pid, capacity, in_flight, hb, connects, disconnects, last_event, last_event_at)
  ON CONFLICT (id) DO UPDATE
    SET owner = EXCLUDED.owner, host = EXCLUDED.host, pid = EXCLUDED.pid, capacity = EXCLUDED.capacity,
        in_flight = EXCLUDED.in_flight, last_heartbeat_at = EXCLUDED.last_heartbeat_at, connected = true,
        connects = EXCLUDED.connects, disconnects = EXCLUDED.disconnects,
        last_connection_event = EXCLUDED.last_connection_event,
        last_connection_event_at = EXCLUDED.last_connection_event_at,
        updated_at = now();
  UPDATE tasker_workers SET connected = false, in_flight = 0, updated_at = now()
   WHERE owner = p_owner AND connected AND NOT (id = ANY (coalesce(p_ids, '{}'::text[])));
  SELECT count(*) INTO v_n FROM tasker_workers WHERE owner = p_owner AND connected;
  RETURN v_n;
END $$;
