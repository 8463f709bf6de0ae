# frozen_string_literal: true

require "time"

module TaskerCore
  class Web
    # The dashboard's reads. Each is a few indexed statements: bench/web_bench.rb
    # times every page with 1M finished steps stored (bench/results/web.json).
    module Queries
      TASK_STATES = %w[pending in_progress complete error cancelled].freeze
      THROUGHPUT_WINDOW_S = 3600
      THROUGHPUT_BUCKET_S = 60
      RECENT_FAILURES = 10

      WORKERS_SQL = <<~SQL
        SELECT id, owner, host, pid, capacity, in_flight, connected, connects, disconnects, queues,
               last_connection_event,
               extract(epoch FROM last_connection_event_at)::float8 AS last_connection_event_at,
               extract(epoch FROM last_heartbeat_at)::float8 AS last_heartbeat_at,
               (extract(epoch FROM now() - last_heartbeat_at) * 1000)::float8 AS heartbeat_age_ms,
               (connected AND last_heartbeat_at > now() - make_interval(secs => $1 / 1000.0)) AS live
          FROM tasker_workers
         ORDER BY live DESC, last_heartbeat_at DESC NULLS LAST, id
         LIMIT $2
      SQL
      ORCHESTRATORS_SQL = <<~SQL
        SELECT name, owner, batch_endpoint, result_endpoint, version,
               extract(epoch FROM registered_at)::float8 AS registered_at,
               (extract(epoch FROM now() - renewed_at) * 1000)::float8 AS renewed_age_ms,
               lease_expires_at > now() AS live
          FROM tasker_orchestrators ORDER BY live DESC, renewed_at DESC LIMIT 50
      SQL

      module_function

      def overview(conn, heartbeat_timeout_ms)
        {
          throughput: throughput(conn),
          tasks_by_state: tasks_by_state(conn),
          depth: depth(conn),
          workers: conn.exec(WORKERS_SQL, [heartbeat_timeout_ms, 50]).select { |w| w["live"] },
          orchestrators: conn.exec(ORCHESTRATORS_SQL).to_a,
          recurring: Recurring.status(conn),
          jobs: JobAdapter.counts(conn),
          failures: conn.exec(<<~SQL, [RECENT_FAILURES]).to_a
            SELECT s.id, s.task_id, s.name, s.attempts, s.last_error, t.namespace, t.name AS task_name,
                   extract(epoch FROM s.last_failure_at)::float8 AS last_failure_at
              FROM tasker_workflow_steps s JOIN tasker_tasks t ON t.id = s.task_id
             WHERE s.state = 'error'
             ORDER BY s.last_failure_at DESC NULLS LAST, s.id DESC LIMIT $1
          SQL
        }
      end

      # Steps completed per second in each minute of the last hour, oldest
      # first (60 values), from the step transitions.
      def throughput(conn)
        counts = conn.exec(<<~SQL, [THROUGHPUT_WINDOW_S, THROUGHPUT_BUCKET_S]).to_h { |r| [r["b"], r["n"]] }
          SELECT floor(extract(epoch FROM now() - created_at) / $2)::int AS b, count(*)::int AS n
            FROM tasker_workflow_step_transitions
           WHERE to_state = 'complete' AND created_at > now() - make_interval(secs => $1)
           GROUP BY 1
        SQL
        buckets = THROUGHPUT_WINDOW_S / THROUGHPUT_BUCKET_S
        (0...buckets).map { |b| counts.fetch(b, 0).to_f / THROUGHPUT_BUCKET_S }.reverse
      end

      def tasks_by_state(conn)
        found = conn.exec("SELECT state, count(*)::bigint AS n FROM tasker_tasks GROUP BY state")
                    .to_h { |r| [r["state"], r["n"]] }
        TASK_STATES.to_h { |s| [s, found.fetch(s, 0)] }
      end

      # The tasks not finished (pending, in progress: the tasker_tasks_unfinished
      # index) and those in error (tasker_tasks_error, migration 0007): counts
      # that stay small however many finished tasks are stored, unlike a
      # count of complete and cancelled tasks, which reads them all.
      OPEN_TASK_STATES = %w[pending in_progress error].freeze

      def open_tasks_by_state(conn)
        found = conn.exec(<<~SQL).to_h { |r| [r["state"], r["n"]] }
          SELECT state, count(*)::bigint AS n FROM tasker_tasks WHERE state IN ('pending', 'in_progress') GROUP BY state
          UNION ALL
          SELECT 'error', count(*)::bigint FROM tasker_tasks WHERE state = 'error'
        SQL
        OPEN_TASK_STATES.to_h { |s| [s, found.fetch(s, 0)] }
      end

      # Ready: pending, no unfinished parent, due (the ready index);
      # in flight: claimed and not yet finished (the in-flight index).
      def depth(conn)
        conn.exec(<<~SQL).first.transform_keys(&:to_sym)
          SELECT (SELECT count(*) FROM tasker_workflow_steps
                   WHERE state = 'pending' AND pending_parents = 0 AND next_attempt_at <= now())::bigint AS ready,
                 (SELECT count(*) FROM tasker_workflow_steps
                   WHERE state = 'pending' AND pending_parents = 0)::bigint AS pending_ready_or_waiting,
                 (SELECT count(*) FROM tasker_workflow_steps
                   WHERE state IN ('enqueued', 'in_progress'))::bigint AS in_flight
        SQL
      end

      # ---- tasks list ---------------------------------------------------

      Filters = Struct.new(:state, :namespace, :name, :created_from, :created_to, :identity_key, :before,
                           keyword_init: true) do
        def to_query = to_h.transform_values { |v| v.is_a?(Time) ? v.utc.iso8601 : v }.compact
      end

      # Query parameters -> Filters; what does not parse is ignored.
      def task_filters(params)
        str = ->(k) { (v = params[k]).is_a?(String) && !v.strip.empty? ? v.strip : nil }
        time = lambda do |k|
          v = str.(k) or next nil
          Time.parse(v.include?("T") || v.match?(/\d:\d/) ? v : "#{v} 00:00:00 UTC").utc
        rescue ArgumentError
          nil
        end
        Filters.new(state: (TASK_STATES & [str.("state")]).first, namespace: str.("namespace"), name: str.("name"),
                    created_from: time.("created_from"), created_to: time.("created_to"),
                    identity_key: str.("identity_key"), before: str.("before")&.then { |v| Integer(v, 10) rescue nil })
      end

      # Newest first, keyset-paginated on id: [rows, id for the next page or nil].
      def tasks(conn, filters, limit:)
        where = []
        args = []
        add = lambda do |sql, value|
          args << value
          where << sql.sub("?", "$#{args.size}")
        end
        add.("state = ?", filters.state) if filters.state
        add.("namespace = ?", filters.namespace) if filters.namespace
        add.("name = ?", filters.name) if filters.name
        add.("identity_key = ?", filters.identity_key) if filters.identity_key
        add.("created_at >= ?::timestamptz", filters.created_from.iso8601(6)) if filters.created_from
        add.("created_at < ?::timestamptz", filters.created_to.iso8601(6)) if filters.created_to
        add.("id < ?", filters.before) if filters.before
        args << limit + 1
        rows = conn.exec(<<~SQL, args).to_a
          SELECT id, namespace, name, version, state, identity_key, step_count, remaining_steps,
                 extract(epoch FROM created_at)::float8 AS created_at,
                 extract(epoch FROM finished_at)::float8 AS finished_at
            FROM tasker_tasks
           #{"WHERE #{where.join(' AND ')}" unless where.empty?}
           ORDER BY id DESC LIMIT $#{args.size}
        SQL
        more = rows.size > limit
        rows = rows.first(limit)
        [rows, more ? rows.last["id"] : nil]
      end

      # ---- one task -----------------------------------------------------

      # The rows TaskerCore::Tasks.task reads, undecoded (the views decode
      # payloads for display), each step with its parents' ids for the DAG.
      def task(conn, id)
        t = conn.exec(Tasks::TASK_SQL, [id]).first or return nil
        steps = conn.exec(Tasks::STEPS_SQL, [id]).to_a
        ids = steps.to_h { |s| [s["name"], s["id"]] }
        steps.each { |s| s["parent_ids"] = s["depends_on"].map { |n| ids[n] } }
        attempts = step_attempts(conn, steps.map { |s| s["id"] })
        steps.each { |s| s["attempt_rows"] = attempts.fetch(s["id"], []) }
        { row: t, steps: steps }
      end

      # step id => [{attempt, owner, claimed_at, ended_at, outcome, reason}], from the transitions.
      def step_attempts(conn, step_ids)
        return {} if step_ids.empty?

        rows = conn.exec(<<~SQL, [step_ids])
          SELECT step_id, attempt, from_state, to_state, owner, reason,
                 extract(epoch FROM created_at)::float8 AS at
            FROM tasker_workflow_step_transitions WHERE step_id = ANY ($1::bigint[])
           ORDER BY step_id, id
        SQL
        rows.group_by { |r| r["step_id"] }.transform_values do |list|
          list.select { |r| r["attempt"].positive? }.group_by { |r| r["attempt"] }.map do |n, trs|
            claim = trs.find { |r| r["reason"] == "claimed" }
            ended = trs.find { |r| %w[enqueued in_progress].include?(r["from_state"]) && r["to_state"] != "in_progress" }
            outcome = if ended.nil? then "running"
                      elsif ended["reason"] == "retry" then "failed, retried"
                      elsif ended["reason"] == "failed" then "failed"
                      else ended["to_state"]
                      end
            { attempt: n, owner: claim&.fetch("owner"), claimed_at: claim&.fetch("at"), ended_at: ended&.fetch("at"),
              outcome: outcome }
          end
        end
      end

      # ---- workers ------------------------------------------------------

      def workers(conn, heartbeat_timeout_ms)
        { workers: conn.exec(WORKERS_SQL, [heartbeat_timeout_ms, 500]).to_a,
          orchestrators: conn.exec(ORCHESTRATORS_SQL).to_a,
          queues: TaskerCore::Queues.summary(conn, heartbeat_timeout_ms: heartbeat_timeout_ms,
                                                   limits: TaskerCore::Queues.configured_limits) }
      end
    end
  end
end
