# frozen_string_literal: true

require_relative "step_counters"

module TaskerCore
  class Web
    # Prometheus text exposition (format 0.0.4) for GET /metrics on the
    # dashboard and on `tasker orchestrator --metrics-port N`.
    #
    # The step counters are this process's totals of the step transitions
    # read so far, a few more at each scrape (StepCounters); the depth, task
    # and worker gauges are indexed counts read at each scrape; the message
    # and database-connection counters are the running OrchestrationHandle's
    # (#stats), so they appear only in a process that runs the loop.
    #
    # Written here rather than with the prometheus-client gem: the gauges
    # and the handle's counters are read at scrape time, and the step
    # counters are added to in batches read at scrape time too, so all of
    # them would have to be copied into its registry on every scrape. The
    # format is small.
    module Metrics
      CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
      LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300].freeze

      module_function

      # GET /metrics alone, for `tasker orchestrator --metrics-port N`.
      def serve(port:, host: "127.0.0.1")
        require_relative "server"
        app = lambda do |env|
          next [404, { "content-type" => "text/plain" }, ["not found\n"]] unless env["PATH_INFO"] == "/metrics"

          timeout = TaskerCore.config.zeromq["heartbeat_timeout_ms"]
          [200, { "content-type" => CONTENT_TYPE }, [exposition(heartbeat_timeout_ms: timeout)]]
        end
        Server.new(app, port: port, host: host).start
      end

      def exposition(heartbeat_timeout_ms:, stats: running_handle_stats)
        out = +""
        Store.with_connection do |c|
          steps(c, out)
          depth(c, out)
          workers(c, out, heartbeat_timeout_ms)
        end
        handle(out, stats) if stats
        out
      end

      # The stats of this process's orchestration handle while its loop runs.
      def running_handle_stats
        manager = Internal::OrchestrationManager.instance
        manager.orchestrating? ? manager.orchestration_handle.stats : nil
      rescue StandardError
        nil
      end

      COUNTERS_LOCK = Mutex.new

      # The process's step counters (one set, whichever app or server scrapes).
      def step_counters
        @step_counters || COUNTERS_LOCK.synchronize { @step_counters ||= StepCounters.new(buckets: LATENCY_BUCKETS) }
      end

      # Replaces them, e.g. with other bounds per scrape:
      # Metrics.step_counters = Metrics::StepCounters.new(buckets: Metrics::LATENCY_BUCKETS, budget_s: 0.25)
      def step_counters=(counters)
        COUNTERS_LOCK.synchronize { @step_counters = counters }
      end

      def steps(conn, out)
        totals, behind = step_counters.scrape(conn)
        rows = totals.sort.map { |(ns, template, step), t| [{ "namespace" => ns, "template" => template, "step" => step }, t] }
        family(out, "tasker_steps_completed_total", "counter",
               "Steps completed (transitions to complete), by task template and step name",
               rows.map { |l, t| [l, t.completed] })
        family(out, "tasker_steps_failed_total", "counter",
               "Steps failed for good (transitions to error), by task template and step name",
               rows.map { |l, t| [l, t.failed] })
        family(out, "tasker_steps_retried_total", "counter",
               "Claims of a step after its first attempt (retries and re-dispatches), by task template and step name",
               rows.map { |l, t| [l, t.retried] })
        out << "# HELP tasker_step_claim_to_complete_seconds From a step's last claim to its transition to complete\n"
        out << "# TYPE tasker_step_claim_to_complete_seconds histogram\n"
        rows.each do |l, t|
          LATENCY_BUCKETS.each_with_index do |b, i|
            sample(out, "tasker_step_claim_to_complete_seconds_bucket", l.merge("le" => b.to_s), t.buckets[i])
          end
          sample(out, "tasker_step_claim_to_complete_seconds_bucket", l.merge("le" => "+Inf"), t.completed)
          sample(out, "tasker_step_claim_to_complete_seconds_sum", l, t.latency_sum)
          sample(out, "tasker_step_claim_to_complete_seconds_count", l, t.completed)
        end
        family(out, "tasker_step_transitions_behind", "gauge",
               "Step transitions logged but not yet read into the step counters (they catch up over the next scrapes)",
               [[{}, behind]])
      end

      def depth(conn, out)
        d = Queries.depth(conn)
        family(out, "tasker_steps_ready", "gauge", "Steps ready to be claimed now", [[{}, d[:ready]]])
        family(out, "tasker_steps_in_flight", "gauge", "Steps claimed and not yet finished", [[{}, d[:in_flight]]])
        family(out, "tasker_tasks", "gauge", "Tasks pending, in progress or in error, by state",
               Queries.open_tasks_by_state(conn).map { |s, n| [{ "state" => s }, n] })
      end

      def workers(conn, out, heartbeat_timeout_ms)
        w = conn.exec(<<~SQL, [heartbeat_timeout_ms]).first
          SELECT count(*) AS n, coalesce(sum(capacity), 0)::bigint AS capacity,
                 coalesce(sum(in_flight), 0)::bigint AS in_flight
            FROM tasker_workers WHERE connected AND last_heartbeat_at > now() - make_interval(secs => $1 / 1000.0)
        SQL
        family(out, "tasker_workers_live", "gauge", "Connected workers with a recent heartbeat", [[{}, w["n"]]])
        family(out, "tasker_workers_capacity", "gauge", "Steps the live workers take at once (threads and prefetch)",
               [[{}, w["capacity"]]])
        family(out, "tasker_workers_in_flight", "gauge", "Steps the live workers report running",
               [[{}, w["in_flight"]]])
        o = conn.exec("SELECT count(*) AS n FROM tasker_orchestrators WHERE lease_expires_at > now()").first
        family(out, "tasker_orchestrators_live", "gauge", "Orchestrators registered with an unexpired lease",
               [[{}, o["n"]]])
      end

      # Counters of the orchestration handle running in this process.
      def handle(out, stats)
        loop_stats = stats["loop"] || stats[:loop] || {}
        # The handle core parses every message once, as it arrives: one count per reason.
        refused = hash_of(stats[:bad_messages]).map { |reason, n| [{ "stage" => "handle", "reason" => reason }, n] }
        family(out, "tasker_messages_refused_total", "counter",
               "Messages from workers refused as malformed or out of place, by where and why", refused)
        dropped = { "send_high_water_mark" => stats.dig(:batch_socket, :send_dropped),
                    "send_refused" => stats[:send_refused],
                    "results_dropped" => loop_stats["results_dropped"] }.compact
        family(out, "tasker_messages_dropped_total", "counter",
               "Messages not delivered (batches refused at the send high-water mark or by a worker, " \
               "results dropped by the loop), by reason",
               dropped.map { |reason, n| [{ "reason" => reason }, n] })
        family(out, "tasker_database_errors_total", "counter", "Database errors seen by the orchestration loop",
               [[{}, loop_stats["db_errors"]]].reject { |_, v| v.nil? })
        family(out, "tasker_database_reconnects_total", "counter",
               "Database reconnections by the orchestration loop", [[{}, loop_stats["db_reconnects"]]].reject { |_, v| v.nil? })
      end

      def hash_of(value) = value.is_a?(Hash) ? value.transform_keys(&:to_s) : {}

      def family(out, name, type, help, samples)
        out << "# HELP #{name} #{help}\n# TYPE #{name} #{type}\n"
        samples.each { |labels, value| sample(out, name, labels, value) }
      end

      def sample(out, name, labels, value)
        out << name
        unless labels.empty?
          out << "{" << labels.map { |k, v| %(#{k}="#{escape(v)}") }.join(",") << "}"
        end
        out << " " << number(value) << "\n"
      end

      def escape(value) = value.to_s.gsub("\\", "\\\\\\\\").gsub("\n", "\\n").gsub('"', '\\"')

      def number(value)
        case value
        when Integer then value.to_s
        when Float then value.finite? ? value.to_s : (value.nan? ? "NaN" : (value.positive? ? "+Inf" : "-Inf"))
        else Float(value || 0).to_s
        end
      end
    end
  end
end
