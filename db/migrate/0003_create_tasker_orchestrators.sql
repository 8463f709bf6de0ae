-- tasker_core schema, version 3: discovery. An orchestrator registers its
-- batch and result endpoints under a name with a lease it keeps renewing;
-- workers configured with discovery.name look the name up and follow
-- changes through LISTEN tasker_discovery.
--
-- A row stays after a revoke (its lease set to now) so that its version is
-- still readable: a watcher compares the version it read with those of the
-- notifications it receives, and acts on each change at most once.
-- lookup = the row whose lease has not expired.

CREATE SEQUENCE tasker_orchestrators_version;

CREATE TABLE tasker_orchestrators (
  name             text PRIMARY KEY,
  batch_endpoint   text NOT NULL,
  result_endpoint  text NOT NULL,
  owner            text NOT NULL,
  version          bigint NOT NULL DEFAULT nextval('tasker_orchestrators_version'),
  lease_expires_at timestamptz NOT NULL,
  registered_at    timestamptz NOT NULL DEFAULT now(),
  renewed_at       timestamptz NOT NULL DEFAULT now()
);

-- One notification per change of a name, in commit order. Payload: JSON
-- {name, version, batch_endpoint, result_endpoint, owner, live}.
CREATE FUNCTION tasker_discovery_notify(r tasker_orchestrators, p_live boolean) RETURNS void
LANGUAGE sql AS $$
  SELECT pg_notify('tasker_discovery', json_build_object(
    'name', r.name, 'version', r.version, 'batch_endpoint', r.batch_endpoint,
    'result_endpoint', r.result_endpoint, 'owner', r.owner, 'live', p_live)::text);
$$;

-- Takes the name when it is free (no row, a revoked or expired lease) or
-- already ours. Returns the row as it is now and whether we hold it.
CREATE FUNCTION tasker_register_orchestrator(p_name text, p_batch text, p_result text, p_owner text,
                                             p_ttl_ms int)
RETURNS TABLE(registered boolean, version bigint, owner text, batch_endpoint text, result_endpoint text,
              lease_expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  r tasker_orchestrators;
BEGIN
  INSERT INTO tasker_orchestrators AS o (name, batch_endpoint, result_endpoint, owner, lease_expires_at)
  VALUES (p_name, p_batch, p_result, p_owner, now() + make_interval(secs => p_ttl_ms / 1000.0))
  ON CONFLICT (name) DO UPDATE
     SET batch_endpoint = EXCLUDED.batch_endpoint, result_endpoint = EXCLUDED.result_endpoint,
         owner = EXCLUDED.owner, lease_expires_at = EXCLUDED.lease_expires_at,
         version = nextval('tasker_orchestrators_version'), registered_at = now(), renewed_at = now()
   WHERE o.owner = EXCLUDED.owner OR o.lease_expires_at <= now()
  RETURNING o.* INTO r;
  IF FOUND THEN
    PERFORM tasker_discovery_notify(r, true);
    RETURN QUERY SELECT true, r.version, r.owner, r.batch_endpoint, r.result_endpoint, r.lease_expires_at;
  ELSE
    RETURN QUERY SELECT false, o.version, o.owner, o.batch_endpoint, o.result_endpoint, o.lease_expires_at
                   FROM tasker_orchestrators o WHERE o.name = p_name;
  END IF;
END;
$$;

-- Extends our live lease; false when it ran out or the name is not ours
-- any more (the caller then registers again, which notifies watchers).
CREATE FUNCTION tasker_renew_orchestrator(p_name text, p_owner text, p_ttl_ms int) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE tasker_orchestrators
     SET lease_expires_at = now() + make_interval(secs => p_ttl_ms / 1000.0), renewed_at = now()
   WHERE name = p_name AND owner = p_owner AND lease_expires_at > now();
  RETURN FOUND;
END;
$$;

-- Clean shutdown: the entry is gone from lookups at once and watchers hear of it.
CREATE FUNCTION tasker_revoke_orchestrator(p_name text, p_owner text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  r tasker_orchestrators;
BEGIN
  UPDATE tasker_orchestrators
     SET lease_expires_at = now(), version = nextval('tasker_orchestrators_version')
   WHERE name = p_name AND owner = p_owner AND lease_expires_at > now()
  RETURNING * INTO r;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM tasker_discovery_notify(r, false);
  RETURN true;
END;
$$;
