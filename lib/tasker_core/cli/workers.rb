# frozen_string_literal: true

require_relative "table"

module TaskerCore
  class CLI
    # tasker workers [--all] [--json]
    class Workers < Command
      DESCRIPTION = <<~TEXT.chomp
        Lists the workers the orchestrators see (the tasker_workers table, written by the
        orchestration loop about once a second): id, host, pid, orchestrator, capacity, steps
        in flight, last heartbeat and its age, socket connects/disconnects and the last
        connection event. Only live workers (connected, heartbeat within
        zeromq.heartbeat_timeout_ms) unless --all.
      TEXT

      # The connection columns (migration 0004) read through to_jsonb so an
      # older schema shows zeros and nulls instead of failing.
      SQL = <<~SQL
        SELECT id, host, pid, owner AS orchestrator, capacity, in_flight,
               coalesce(ARRAY(SELECT jsonb_array_elements_text(to_jsonb(w) -> 'queues')), '{default}') AS queues,
               (connected AND last_heartbeat_at > now() - make_interval(secs => $1 / 1000.0)) AS live,
               extract(epoch FROM last_heartbeat_at)::float8 AS last_heartbeat_at,
               round((extract(epoch FROM now() - last_heartbeat_at) * 1000)::numeric)::bigint AS heartbeat_age_ms,
               coalesce((to_jsonb(w) ->> 'connects')::int, 0) AS connects,
               coalesce((to_jsonb(w) ->> 'disconnects')::int, 0) AS disconnects,
               to_jsonb(w) ->> 'last_connection_event' AS last_connection_event,
               extract(epoch FROM (to_jsonb(w) ->> 'last_connection_event_at')::timestamptz)::float8
                 AS last_connection_event_at
          FROM tasker_workers w
         WHERE $2 OR (connected AND last_heartbeat_at > now() - make_interval(secs => $1 / 1000.0))
         ORDER BY id
      SQL

      # [{"id" => ..., "last_heartbeat_at" => Time, ...}], or nil when the
      # database has no workers table (the orchestrator's migration has not run).
      def self.list(conn, heartbeat_timeout_ms:, all: false)
        return nil unless conn.exec("SELECT to_regclass('tasker_workers') IS NOT NULL AS ok").first["ok"]

        conn.exec(SQL, [heartbeat_timeout_ms, all]).map do |row|
          w = row.to_h
          %w[last_heartbeat_at last_connection_event_at].each { |k| w[k] = w[k] && Time.at(w[k]).utc }
          w
        end
      end

      # Rows for Table.render under HEADERS.
      HEADERS = %w[WORKER HOST PID QUEUES CAPACITY IN_FLIGHT LAST_HEARTBEAT AGE CONNECTS/DISCONNECTS LAST_EVENT(AT)].freeze

      def self.rows(workers)
        workers.map do |w|
          event = w["last_connection_event"]
          at = w["last_connection_event_at"]
          [w["id"], w["host"], w["pid"], Array(w["queues"]).join(","), w["capacity"], w["in_flight"],
           TaskerCore.iso8601(w["last_heartbeat_at"]),
           w["heartbeat_age_ms"] && "#{(w['heartbeat_age_ms'].to_i / 1000.0).round(1)}s ago",
           "#{w['connects']}/#{w['disconnects']}", event ? "#{event}#{" (#{TaskerCore.iso8601(at)})" if at}" : "-"]
        end
      end

      private

      def define_options(o)
        o.on("--all", "include disconnected workers and those whose heartbeat is too old") { @options[:all] = true }
        o.on("--json", "print JSON") { @options[:json] = true }
      end

      def call(_args)
        use_database!
        workers = Store.with_connection do |c|
          self.class.list(c, heartbeat_timeout_ms: config.zeromq["heartbeat_timeout_ms"], all: @options[:all] || false)
        end
        raise Error, "no tasker_workers table: run `tasker db:migrate`" if workers.nil?
        return print_json(workers) || EXIT_OK if @options[:json]

        if workers.empty?
          out.puts @options[:all] ? "no workers" : "no live workers"
        else
          headers = HEADERS.dup.insert(5, "ORCHESTRATOR")
          rows = self.class.rows(workers).each_with_index.map { |r, i| r.dup.insert(5, workers[i]["orchestrator"]) }
          if @options[:all]
            headers << "LIVE"
            rows.each_with_index { |r, i| r << (workers[i]["live"] ? "yes" : "no") }
          end
          out.puts Table.render(headers, rows)
        end
        EXIT_OK
      end
    end
  end
end
