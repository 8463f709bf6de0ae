# frozen_string_literal: true

require_relative "errors"

module TaskerCore
  # The rules every layer shares for queues, priorities and concurrency
  # limits (templates, create_task, the worker, the configuration). The
  # claim that honours them is SQL (db/migrate/0011).
  module Queues
    DEFAULT = "default"
    # Queue names: letters, digits and _ . : - , 1 to 63 characters.
    NAME = /\A[A-Za-z0-9_.:-]{1,63}\z/
    # Higher runs first. One point is worth one second of waiting (the
    # claim orders by ready time less priority seconds), so a ready step is
    # passed by steps that became ready after it for at most
    # (highest priority in its queue - its priority) seconds: 200 s at most.
    PRIORITY = (-100..100)
    # A worker serves at most this many queues (advertised in heartbeats).
    MAX_PER_WORKER = 16
    # %{context.a.b} in a concurrency key.
    KEY_FIELD = /%\{context((?:\.[A-Za-z0-9_-]+)+)\}/

    # Per queue: steps ready now, waiting to start (scheduled or backing
    # off), in flight, and the live workers serving it (tasker_workers).
    # Ready steps are read through the claim's index, in-flight ones
    # through tasker_workflow_steps_in_flight.
    SUMMARY_SQL = <<~SQL
      WITH ready AS (
        SELECT queue, count(*) FILTER (WHERE next_attempt_at <= now())::bigint AS ready,
               count(*) FILTER (WHERE next_attempt_at > now())::bigint AS waiting
          FROM tasker_workflow_steps WHERE state = 'pending' AND pending_parents = 0 GROUP BY queue
      ), flight AS (
        SELECT queue, count(*)::bigint AS in_flight
          FROM tasker_workflow_steps WHERE state IN ('enqueued', 'in_progress') GROUP BY queue
      ), served AS (
        SELECT q.queue, count(*)::bigint AS workers, sum(w.capacity)::bigint AS capacity
          FROM tasker_workers w CROSS JOIN LATERAL unnest(w.queues) AS q(queue)
         WHERE w.connected AND w.last_heartbeat_at > now() - make_interval(secs => $1 / 1000.0)
         GROUP BY q.queue
      )
      SELECT coalesce(r.queue, f.queue, s.queue) AS queue, coalesce(r.ready, 0) AS ready,
             coalesce(r.waiting, 0) AS waiting, coalesce(f.in_flight, 0) AS in_flight,
             coalesce(s.workers, 0) AS workers, coalesce(s.capacity, 0) AS capacity
        FROM ready r
        FULL JOIN flight f ON f.queue = r.queue
        FULL JOIN served s ON s.queue = coalesce(r.queue, f.queue)
       ORDER BY 1
    SQL

    module_function

    # [{"queue", "ready", "waiting", "in_flight", "workers", "capacity",
    # "concurrency" (the configured limit or nil), "unserved" (ready steps
    # and no live worker)}], by queue name.
    def summary(conn, heartbeat_timeout_ms:, limits: {})
      conn.exec(SUMMARY_SQL, [heartbeat_timeout_ms]).map do |r|
        r.to_h.merge("concurrency" => limits[r["queue"]], "unserved" => r["ready"].positive? && r["workers"].zero?)
      end
    end

    # { queue => concurrency } from the configuration's queues: section.
    def configured_limits(config = TaskerCore.config)
      (config["queues"] || {}).to_h { |name, opts| [name.to_s, opts && opts["concurrency"]] }.compact
    end

    def name?(value) = value.is_a?(String) && value.match?(NAME)
    def priority?(value) = value.is_a?(Integer) && PRIORITY.cover?(value)

    def name_problem(value)
      "expected a queue name (1 to 63 of A-Z a-z 0-9 _ . : -), got #{value.inspect}"
    end

    def priority_problem(value)
      "expected an Integer between #{PRIORITY.min} and #{PRIORITY.max} (higher runs first), got #{value.inspect}"
    end

    # A list of queue names ("a,b" or ["a", "b"]); ArgumentError naming
    # what is wrong.
    def list(value)
      names = value.is_a?(String) ? value.split(",").map(&:strip) : Array(value).map { |v| v.is_a?(Symbol) ? v.to_s : v }
      bad = names.find { |n| !name?(n) }
      raise ArgumentError, "queues: #{name_problem(bad)}" if bad
      raise ArgumentError, "queues: expected 1 to #{MAX_PER_WORKER} queue names, got #{names.size}" unless names.size.between?(1, MAX_PER_WORKER)

      names.uniq.freeze
    end

    # The key of a concurrency limit for one task: each %{context.path}
    # replaced by the value at that path of its context (a String, Symbol or
    # Integer). nil when the template set no key. ValidationError naming the
    # template and the path when a value is missing.
    def concurrency_key(template, pattern, context)
      return nil if pattern.nil?

      pattern.gsub(KEY_FIELD) do
        path = Regexp.last_match(1).delete_prefix(".").split(".")
        value = path.reduce(context) { |h, k| h.is_a?(Hash) ? h.fetch(k) { h[k.to_sym] } : nil }
        unless value.is_a?(String) || value.is_a?(Symbol) || value.is_a?(Integer)
          raise ValidationError, "context for #{template}: concurrency.key #{pattern.inspect} needs context." \
                                 "#{path.join('.')} (a String or Integer), got #{value.inspect}"
        end
        value.to_s
      end
    end
  end
end
