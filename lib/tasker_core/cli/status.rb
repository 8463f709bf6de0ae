# frozen_string_literal: true

require_relative "table"
require_relative "workers"

module TaskerCore
  class CLI
    # tasker status [--json]
    class Status < Command
      DESCRIPTION = <<~TEXT.chomp
        Shows tasks and steps by state, steps completed per second over the last minute
        (from the step transitions) and the live workers the orchestrator knows
        (capacity, steps in flight, last heartbeat, socket connects/disconnects and
        the last connection event), per queue the steps ready, waiting to start and in
        flight, its concurrency limit and the live workers serving it, naming the queues
        with ready steps and no worker, the recurring tasks of the configuration with their
        last and next ticks, and ActiveJob jobs by class and state. --json prints the same for scripts.
      TEXT
      WINDOW_S = 60
      TASK_STATES = %w[pending in_progress complete error cancelled].freeze
      STEP_STATES = %w[pending enqueued in_progress complete error cancelled resolved_manually].freeze

      private

      def define_options(o)
        o.on("--json", "print JSON") { @options[:json] = true }
      end

      def call(_args)
        use_database!
        report = Store.with_connection { |c| gather(c) }
        @options[:json] ? print_json(report) : print_table(report)
        EXIT_OK
      end

      def gather(conn)
        tasks = counts(conn, "tasker_tasks", TASK_STATES)
        steps = counts(conn, "tasker_workflow_steps", STEP_STATES)
        done = conn.exec(<<~SQL, [WINDOW_S]).first["n"]
          SELECT count(*)::int AS n FROM tasker_workflow_step_transitions
           WHERE to_state = 'complete' AND created_at > now() - make_interval(secs => $1)
        SQL
        { "tasks" => tasks, "steps" => steps, "steps_per_second" => (done.to_f / WINDOW_S).round(2),
          "window_seconds" => WINDOW_S, "workers" => workers(conn),
          "queues" => Queues.summary(conn, heartbeat_timeout_ms: config.zeromq["heartbeat_timeout_ms"],
                                           limits: Queues.configured_limits(config)),
          "recurring" => Recurring.status(conn, config), "jobs" => JobAdapter.counts(conn) }
      end

      def counts(conn, table, states)
        found = conn.exec("SELECT state, count(*)::bigint AS n FROM #{table} GROUP BY state").to_h { |r| [r["state"], r["n"]] }
        states.to_h { |s| [s, found.fetch(s, 0)] }.merge(found)
      end

      def workers(conn)
        Workers.list(conn, heartbeat_timeout_ms: config.zeromq["heartbeat_timeout_ms"])
      end

      def print_table(report)
        out.puts "Tasks"
        out.puts Table.render(%w[STATE COUNT], report["tasks"].to_a)
        out.puts
        out.puts "Steps"
        out.puts Table.render(%w[STATE COUNT], report["steps"].to_a)
        out.puts
        out.puts "Throughput: #{report['steps_per_second']} steps/s completed over the last #{WINDOW_S}s"
        out.puts
        print_queues(report["queues"])
        workers = report["workers"]
        if workers.nil?
          out.puts "Workers: unknown (no tasker_workers table: run `tasker db:migrate` with a tasker_core " \
                   "that has the orchestration loop)"
        elsif workers.empty?
          out.puts "Workers: none live"
        else
          out.puts "Workers (#{workers.size} live)"
          out.puts Table.render(Workers::HEADERS, Workers.rows(workers))
        end
        print_recurring(report["recurring"])
        print_jobs(report["jobs"])
      end

      def print_jobs(jobs)
        return if jobs.empty?

        out.puts
        out.puts "ActiveJob jobs (tasks of active_job/perform) by class"
        out.puts Table.render(%w[JOB_CLASS STATE COUNT], jobs.map { |j| j.values_at("job_class", "state", "count") })
      end

      def print_recurring(schedules)
        return if schedules.empty?

        out.puts
        out.puts "Recurring tasks (#{schedules.size})"
        rows = schedules.map do |s|
          [s["name"], s["task"], s["cron"], s["last_tick_at"] || "-", s["last_task_id"] || "-", s["next_tick_at"]]
        end
        out.puts Table.render(%w[NAME TASK CRON LAST_TICK LAST_TASK NEXT_TICK], rows)
      end

      QUEUE_HEADERS = %w[QUEUE READY WAITING IN_FLIGHT LIMIT WORKERS CAPACITY].freeze

      def print_queues(queues)
        return if queues.empty?

        out.puts "Queues"
        out.puts Table.render(QUEUE_HEADERS, queues.map do |q|
          [q["queue"], q["ready"], q["waiting"], q["in_flight"], q["concurrency"] || "-", q["workers"], q["capacity"]]
        end)
        unserved = queues.select { |q| q["unserved"] }.map { |q| q["queue"] }
        unless unserved.empty?
          out.puts "Ready steps and no live worker serving #{unserved.size == 1 ? 'the queue' : 'the queues'} " \
                   "#{unserved.join(', ')}: start a worker with --queues #{unserved.join(',')}"
        end
        out.puts
      end
    end
  end
end
