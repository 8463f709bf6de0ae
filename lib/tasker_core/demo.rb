# frozen_string_literal: true

require "fileutils"
require "rbconfig"
require "socket"
require "json"
require_relative "cli/progress"

module TaskerCore
  # The order-fulfilment demo behind `tasker demo` and bin/demo: a real
  # deployment in miniature. It starts (or reuses) PostgreSQL, migrates it,
  # runs `tasker orchestrator` and `tasker worker` as child processes on
  # free ports, creates N order tasks (examples/order_fulfilment), follows
  # them to the end and reports what happened, from the database.
  #
  # Processes it starts run in their own process groups, so Ctrl-C reaches
  # only the demo, which then stops them (TERM, then KILL after a grace
  # period). The embedded PostgreSQL (tmp/postgres, used when no database is
  # configured) is left running for the next run, unless stop_postgres: true.
  class Demo
    EXAMPLE_DIR = File.expand_path("../../examples/order_fulfilment", __dir__)
    EXE = File.expand_path("../../exe/tasker", __dir__)
    LIB = File.expand_path("..", __dir__)
    NAMESPACE = "demo"
    TEMPLATE = "order_fulfilment"
    STOP_GRACE_S = 15
    CREATE_CHUNK = 20
    SKUS = %w[book-123 lamp-7 mug-42 desk-9 chair-3 pen-1000].freeze

    attr_reader :summary

    # database_url: nil -> embedded PostgreSQL in tmp/postgres (database tasker_demo)
    def initialize(tasks: 1000, workers: 2, concurrency: 10, database_url: nil, config_path: nil, env: nil,
                   stall_timeout: 60, stop_postgres: false, log_dir: File.join(Dir.pwd, "tmp", "demo"),
                   out: $stdout, err: $stderr)
      @tasks = tasks
      @workers = workers
      @concurrency = concurrency
      @database_url = database_url
      @config_path = config_path
      @env = env
      @stall_timeout = stall_timeout
      @stop_postgres = stop_postgres
      @log_dir = log_dir
      @out = out
      @err = err
      @children = {}
    end

    # Returns 0 when every task completed, 1 otherwise (the summary says why).
    def run
      FileUtils.mkdir_p(@log_dir)
      url = prepare_database
      cancel_leftovers
      start_processes(url)
      wait_for_workers
      started = now
      first_id, last_id = create_tasks
      follow(first_id, last_id)
      elapsed = now - started
      @summary = collect_summary(first_id, last_id, elapsed)
      print_summary(@summary)
      @summary["tasks_complete"] == @tasks ? 0 : 1
    ensure
      stop_processes
      stop_embedded if @stop_postgres && @embedded_dir
    end

    private

    def say(msg)
      @err.puts "demo: #{msg}"
      @err.flush
    end

    def prepare_database
      url = @database_url
      if url.nil? || url.empty?
        @embedded_dir = EmbeddedPostgres.default_dir
        say "starting the embedded PostgreSQL in #{relative(@embedded_dir)} (no DATABASE_URL or database.url set)"
        url = EmbeddedPostgres.start(dir: @embedded_dir, database: "tasker_demo")
      end
      applied = Store.migrate!(url)
      say "database migrated (#{applied.empty? ? 'up to date' : "applied #{applied.join(', ')}"})"
      Store.pool = Store::Pool.new(url: url, size: 5, connect_timeout: 10)
      @url = url
    end

    # Unfinished demo tasks from an interrupted run would compete with this one.
    def cancel_leftovers
      n = Store.with_connection do |c|
        c.exec(<<~SQL, [NAMESPACE, TEMPLATE]).first["n"]
          SELECT count(tasker_cancel_task(id))::int AS n FROM tasker_tasks
           WHERE namespace = $1 AND name = $2 AND state IN ('pending', 'in_progress')
        SQL
      end
      say "cancelled #{n} unfinished demo task#{'s' unless n == 1} left by an earlier run" if n.positive?
    end

    def start_processes(url)
      env = { "DATABASE_URL" => url,
              "TASKER_BATCH_ENDPOINT" => "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}",
              "TASKER_RESULT_ENDPOINT" => "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}" }
      common = [*(@config_path ? ["--config", @config_path] : []), *(@env ? ["--env", @env] : [])]
      spawn_child("orchestrator", env, ["orchestrator", "--stats-interval", "5", *common])
      @workers.times do |i|
        spawn_child("worker-#{i + 1}", env, ["worker", "--handlers", File.join(EXAMPLE_DIR, "handlers.rb"),
                                             "--concurrency", @concurrency.to_s, "--worker-id", "demo-worker-#{i + 1}",
                                             *common])
      end
      say "started 1 orchestrator and #{@workers} workers (#{@concurrency} threads each); logs in #{relative(@log_dir)}/"
    end

    def spawn_child(name, env, args)
      log = File.join(@log_dir, "#{name}.log")
      pid = Process.spawn(env, RbConfig.ruby, "-I", LIB, EXE, *args,
                          in: File::NULL, out: [log, "w"], err: [:child, :out], pgroup: true)
      @children[name] = { pid: pid, log: log }
    end

    # The orchestrator records live workers in tasker_workers; without that
    # table, go on: workers that join late still get the work.
    def wait_for_workers
      deadline = now + 30
      loop do
        check_children!
        live = Store.with_connection do |c|
          next nil unless c.exec("SELECT to_regclass('tasker_workers') IS NOT NULL AS ok").first["ok"]

          c.exec("SELECT count(*)::int AS n FROM tasker_workers WHERE connected AND id LIKE 'demo-worker-%' " \
                 "AND last_heartbeat_at > now() - interval '5 seconds'").first["n"]
        end
        return if live.nil? || live >= @workers
        raise Error, "the workers did not report to the orchestrator within 30s (logs in #{relative(@log_dir)}/)" if now > deadline

        sleep 0.1
      end
    end

    def create_tasks
      templates = TaskTemplateRegistry.new(dir: File.join(EXAMPLE_DIR, "templates"), validate_handlers: false)
      progress = CLI::Progress.new(title: "Creating tasks", total: @tasks, io: @err, unit: " tasks")
      seed = (Time.now.to_f * 1000).to_i % 1_000_000 * 10_000
      ids = Array.new(@tasks)
      next_index = 0
      lock = Mutex.new
      created = 0
      threads = Array.new(4) do
        Thread.new do
          loop do
            range = lock.synchronize { (next_index...[next_index + CREATE_CHUNK, @tasks].min).tap { next_index += CREATE_CHUNK } }
            break if range.none?

            # One commit per chunk, as a bulk import would do.
            Store.transaction do
              range.each do |i|
                ids[i] = Tasks.create_task(name: TEMPLATE, namespace: NAMESPACE, context: order(seed + i + 1),
                                           templates: templates)
              end
            end
            lock.synchronize { created += range.size }
          end
        end
      end
      until threads.none?(&:alive?)
        threads.each { |t| t.join(0.1) }
        progress.update(lock.synchronize { created })
      end
      threads.each(&:value) # re-raise a failure
      progress.finish
      ids.minmax
    ensure
      threads&.each(&:kill)
    end

    def order(order_id)
      items = Array.new(1 + (order_id % 3)) do |k|
        { "sku" => SKUS[(order_id + k) % SKUS.size], "quantity" => 1 + ((order_id + k) % 4),
          "unit_price_cents" => 499 + (((order_id * 7) + k) % 50) * 100 }
      end
      { "order_id" => order_id, "customer_email" => "customer#{order_id}@example.com", "items" => items }
    end

    def follow(first_id, last_id)
      progress = CLI::Progress.new(title: "Tasks finished", total: @tasks, io: @err, unit: " tasks",
                                   start: finished_count(first_id, last_id))
      last_done = -1
      last_change = now
      loop do
        check_children!
        done = finished_count(first_id, last_id)
        progress.update(done)
        break if done >= @tasks

        if done != last_done
          last_done = done
          last_change = now
        elsif now - last_change > @stall_timeout
          raise Error, "no task finished for #{@stall_timeout}s (#{done}/#{@tasks} done); see the logs in " \
                       "#{relative(@log_dir)}/"
        end
        sleep 0.2
      end
      progress.finish
    end

    def finished_count(first_id, last_id)
      Store.with_connection do |c|
        c.exec(<<~SQL, [first_id, last_id]).first["n"]
          SELECT count(*)::int AS n FROM tasker_tasks
           WHERE id BETWEEN $1 AND $2 AND state IN ('complete', 'error', 'cancelled')
        SQL
      end
    end

    def collect_summary(first_id, last_id, elapsed)
      Store.with_connection do |c|
        tasks = c.exec("SELECT state, count(*)::int AS n FROM tasker_tasks WHERE id BETWEEN $1 AND $2 GROUP BY state",
                       [first_id, last_id]).to_h { |r| [r["state"], r["n"]] }
        steps = c.exec(<<~SQL, [first_id, last_id]).first
          SELECT count(*)::int AS steps,
                 count(*) FILTER (WHERE state = 'complete')::int AS complete,
                 count(*) FILTER (WHERE state = 'error')::int AS failed,
                 coalesce(sum(greatest(attempts - 1, 0)), 0)::int AS retries
            FROM tasker_workflow_steps WHERE task_id BETWEEN $1 AND $2
        SQL
        failed_attempts = c.exec(<<~SQL, [first_id, last_id]).first["n"]
          SELECT count(*)::int AS n FROM tasker_workflow_step_transitions
           WHERE task_id BETWEEN $1 AND $2 AND from_state IN ('enqueued', 'in_progress') AND to_state IN ('pending', 'error')
             -- a handler's failure (retried, or final), or a step failed for good at the orchestrator;
             -- not a step put back unstarted (released, unknown_handler, draining) or a lost attempt
             AND (reason IN ('retry', 'failed') OR to_state = 'error')
        SQL
        latency = c.exec(<<~SQL, [first_id, last_id]).first
          WITH attempts AS (
            SELECT step_id, attempt,
                   min(created_at) FILTER (WHERE reason = 'claimed') AS enqueued_at,
                   min(created_at) FILTER (WHERE to_state = 'complete') AS completed_at
              FROM tasker_workflow_step_transitions
             WHERE task_id BETWEEN $1 AND $2
             GROUP BY step_id, attempt
          )
          SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - enqueued_at)) AS p50,
                 percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - enqueued_at)) AS p99
            FROM attempts WHERE enqueued_at IS NOT NULL AND completed_at IS NOT NULL
        SQL
        {
          "tasks" => @tasks, "tasks_complete" => tasks.fetch("complete", 0), "tasks_error" => tasks.fetch("error", 0),
          "tasks_cancelled" => tasks.fetch("cancelled", 0),
          "steps" => steps["steps"], "steps_complete" => steps["complete"], "steps_failed" => steps["failed"],
          "retries" => steps["retries"], "failed_attempts" => failed_attempts,
          "p50_step_latency_ms" => latency["p50"] && (latency["p50"] * 1000).round(1),
          "p99_step_latency_ms" => latency["p99"] && (latency["p99"] * 1000).round(1),
          "elapsed_s" => elapsed.round(2), "steps_per_second" => (steps["complete"] / elapsed).round(1),
          "workers" => @workers, "concurrency" => @concurrency
        }
      end
    end

    def print_summary(s)
      @out.puts
      @out.puts "Order fulfilment demo: #{s['tasks']} orders, 1 orchestrator, #{s['workers']} workers x #{s['concurrency']} threads"
      rows = [
        ["tasks", "#{s['tasks_complete']} complete, #{s['tasks_error']} failed, #{s['tasks_cancelled']} cancelled"],
        ["steps", "#{s['steps_complete']} complete of #{s['steps']}"],
        ["retries", "#{s['retries']} (#{s['failed_attempts']} failed attempts, retried)"],
        ["failures", "#{s['steps_failed']} steps failed for good"],
        ["step latency", "p50 #{fmt_ms(s['p50_step_latency_ms'])}, p99 #{fmt_ms(s['p99_step_latency_ms'])} " \
                         "(enqueued -> complete)"],
        ["throughput", "#{s['steps_per_second']} steps/s (#{s['elapsed_s']}s wall clock)"]
      ]
      width = rows.map { |r| r[0].size }.max
      rows.each { |k, v| @out.puts "  #{k.ljust(width)}  #{v}" }
      @out.flush
    end

    def fmt_ms(value) = value ? "#{value}ms" : "n/a"

    def check_children!
      @children.each do |name, child|
        next if child[:status]

        _pid, status = Process.waitpid2(child[:pid], Process::WNOHANG)
        next unless status

        child[:status] = status
        tail = File.readlines(child[:log]).last(3).map(&:strip).reject(&:empty?).join(" | ") rescue ""
        raise Error, "the #{name} process exited (#{status.exitstatus || status.termsig}): #{tail[0, 300]} " \
                     "(log: #{relative(child[:log])})"
      end
    end

    # TERM every child, then wait (KILL after the grace period). Workers drain
    # their running steps; the orchestrator stops its loop.
    def stop_processes
      live = @children.reject { |_n, c| c[:status] }
      return if live.empty?

      # A second Ctrl-C while cleaning up hurries it (KILL) instead of abandoning the children.
      hurry = false
      previous = %w[INT TERM].to_h { |sig| [sig, trap(sig) { hurry = true }] }
      live.each_value do |c|
        Process.kill(:TERM, c[:pid])
      rescue Errno::ESRCH
        nil
      end
      deadline = now + STOP_GRACE_S
      live.each_value do |c|
        loop do
          break if Process.waitpid(c[:pid], Process::WNOHANG)

          if hurry || now > deadline
            begin
              Process.kill(:KILL, -c[:pid])
            rescue Errno::ESRCH
              nil
            end
            Process.waitpid(c[:pid])
            break
          end
          sleep 0.05
        end
      rescue Errno::ECHILD
        nil
      end
      @children.clear
      say "stopped the orchestrator and workers"
    ensure
      previous&.each { |sig, handler| trap(sig, handler || "DEFAULT") }
    end

    def stop_embedded
      Store.disconnect!
      EmbeddedPostgres.stop(dir: @embedded_dir)
      say "stopped the embedded PostgreSQL"
    end

    def relative(path)
      path.start_with?("#{Dir.pwd}/") ? path.delete_prefix("#{Dir.pwd}/") : path
    end

    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end
