# frozen_string_literal: true

# The end-to-end contenders, shared by bench/e2e_bench.rb and
# bench/scale_bench.rb. Each #run_* creates N no-op steps, has them executed
# and their completion recorded, and returns
#   { steps:, seconds:, steps_per_s:, cpu_us_per_step:, latency_p50_ms:, latency_p99_ms:, ... }
# The timed window starts just before the work is created (the processes
# that execute it are already up and idle) and ends at the last completion
# (wall clock, read from the store/the job). CPU is the utime+stime delta,
# over that window, of every process involved: the driver (this process,
# which creates the work), the executing processes, and the PostgreSQL
# cluster (postmaster, its live backends and its reaped ones) or redis-server.

require_relative "harness"
require "tasker_core"
require "tmpdir"

module Bench
  class E2E
    STEPS_PER_TASK = 10
    WORKERS = 2
    WORKER_CONCURRENCY = Integer(ENV.fetch("E2E_WORKER_CONCURRENCY", "50"))
    WORKER_PREFETCH = Integer(ENV.fetch("E2E_WORKER_PREFETCH", "100"))
    SIDEKIQ_THREADS = 10
    CREATE_CHUNK = 100 # tasks per creating statement
    HERE = __dir__
    E2E_DIR = File.expand_path("../e2e", __dir__)

    attr_reader :url, :pg_dir

    def initialize(log: $stderr)
      @log = log
      @children = []
      E2E.register_template
    end

    # --- PostgreSQL --------------------------------------------------------

    def start_postgres
      @pg_dir = Dir.mktmpdir("tasker_bench_pg")
      File.chmod(0o755, @pg_dir)
      @url = TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_bench")
      enable_statement_profile if PROFILE
      log_plans if PLANS
      TaskerCore::Store.migrate!(@url)
      @conn = TaskerCore::Store::Connection.new(@url, connect_timeout: 10)
      settings = @conn.exec("SELECT name, setting FROM pg_settings WHERE name IN " \
                            "('synchronous_commit','fsync','shared_buffers','max_connections','wal_sync_method')")
      @pg_settings = settings.to_h { |r| [r["name"], r["setting"]] }
      unless @pg_settings["synchronous_commit"] == "on" && @pg_settings["fsync"] == "on"
        raise "the benchmark needs synchronous_commit and fsync on, got #{@pg_settings}"
      end

      @postmaster = File.read(File.join(@pg_dir, "data", "postmaster.pid")).to_i
      @url
    end

    attr_reader :pg_settings, :conn

    # E2E_PROFILE=1: over each run of ours, pg_stat_statements (track =
    # all, so the statements inside the SQL functions count too) and a
    # sampling CPU profile of the database, the orchestrator and the
    # workers (perf); their tops go into the result (:top_statements,
    # :cpu_profile).
    PROFILE = ENV["E2E_PROFILE"] == "1"

    def enable_statement_profile
      TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir)
      File.open(File.join(@pg_dir, "data", "postgresql.conf"), "a") do |f|
        f.puts "shared_preload_libraries = 'pg_stat_statements'"
        f.puts "pg_stat_statements.track = all"
      end
      @url = TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_bench")
      TaskerCore::Store::Connection.new(@url, connect_timeout: 10).tap do |c|
        c.exec("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
      ensure
        c.close
      end
    end

    # E2E_PLANS=DIR: every statement's plan, nested ones included, with the
    # rows and loops of each node (auto_explain, no timing), in the
    # cluster's log, copied to DIR/postgres.log when the cluster stops;
    # `ruby bench/plan_audit.rb DIR/postgres.log` lists the nodes run once
    # per row of another (a plan whose cost grows with the square of a call's
    # size). Costs every statement a plan print: for reading plans, not for
    # figures.
    PLANS = ENV["E2E_PLANS"]

    def log_plans
      TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir)
      File.open(File.join(@pg_dir, "data", "postgresql.conf"), "a") do |f|
        f.puts "session_preload_libraries = 'auto_explain'"
        f.puts "auto_explain.log_min_duration = 0"
        f.puts "auto_explain.log_nested_statements = on"
        f.puts "auto_explain.log_analyze = on"
        f.puts "auto_explain.log_timing = off"
      end
      @url = TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_bench")
    end

    # The statements that took the most time since the last reset, per step.
    def top_statements(steps, limit = 12)
      @conn.exec(<<~SQL, [limit]).map do |r|
        SELECT calls, total_exec_time, rows, toplevel, regexp_replace(query, '\\s+', ' ', 'g') AS query
          FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT $1
      SQL
        { "query" => r["query"][0, 140], "calls" => r["calls"].to_i, "rows" => r["rows"].to_i,
          "toplevel" => r["toplevel"] == "t", "exec_us_per_step" => (r["total_exec_time"].to_f * 1e3 / steps).round(2) }
      end
    end

    def stop_postgres
      @conn&.close
      TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir) if @pg_dir
      if PLANS && @pg_dir
        FileUtils.mkdir_p(PLANS)
        FileUtils.cp(File.join(@pg_dir, "postgres.log"), PLANS)
      end
      FileUtils.rm_rf(@pg_dir) if @pg_dir
    end

    def reset_tasker_tables
      @conn.exec("TRUNCATE tasker_workflow_step_transitions, tasker_task_transitions, tasker_workflow_step_edges, " \
                 "tasker_workflow_steps, tasker_tasks RESTART IDENTITY CASCADE")
      @conn.exec("VACUUM ANALYZE")
    end

    # --- redis ---------------------------------------------------------------

    def start_redis
      @redis_port = Bench.free_port
      @redis_dir = Dir.mktmpdir("tasker_bench_redis")
      @redis_pid = Process.spawn("redis-server", "--port", @redis_port.to_s, "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", @redis_dir,
                                 out: File::NULL, err: File::NULL)
      require "socket"
      Bench.wait_until(10, "redis-server") do
        TCPSocket.new("127.0.0.1", @redis_port).close
        true
      rescue SystemCallError
        false
      end
      "redis://127.0.0.1:#{@redis_port}/0"
    end

    def stop_redis
      Bench.stop_process(@redis_pid) if @redis_pid
      FileUtils.rm_rf(@redis_dir) if @redis_dir
    end

    def redis_url = "redis://127.0.0.1:#{@redis_port}/0"

    # --- one contender at a time ------------------------------------------------

    # The processes of Sidekiq and of the Rails peers, which poll or
    # heartbeat while idle, by contender key (e2e_bench.rb's CONTENDERS).
    # Ours and ours via ActiveJob are left running: a paused worker would come
    # back lost to its orchestrator (heartbeat timeout), and an idle loop
    # costs one empty claim per poll interval.
    def pausable_processes
      procs = {}
      { "sidekiq1" => "1x10", "sidekiq2" => "2x10" }.each do |key, config|
        procs[key] = @sidekiq_pids[config] if @sidekiq_pids&.key?(config)
      end
      (@peers || {}).each { |name, st| procs[name] = st[:pids] unless ACTIVEJOB_PEERS.fetch(name)[:before] }
      procs
    end

    # Runs the block (one timed run of the contender `key`) on a quiet
    # machine: the cluster checkpointed (each run starts after a checkpoint
    # and pays the same full-page writes) with no autovacuum worker left
    # from the previous run, and the other pausable contenders' processes
    # (and what they forked) stopped with SIGSTOP until the block returns. A
    # process is never left stopped inside a transaction: its snapshot
    # would hold back the cleanup of every table in the database.
    def alone(key)
      quiesce_database
      stopped = stop_idle(Bench.tree_pids(pausable_processes.reject { |k, _| k == key }.values.flatten))
      yield
    ensure
      signal_all(stopped || [], "CONT")
    end

    def quiesce_database
      @conn.exec("CHECKPOINT")
      Bench.wait_until(120, "autovacuum to finish", interval: 0.2) do
        @conn.exec("SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
             .first["n"].to_i.zero?
      end
    end

    def stop_idle(pids, tries: 50)
      tries.times do
        signal_all(pids, "STOP")
        open = @conn.exec("SELECT count(*) AS n FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' " \
                          "AND pid <> pg_backend_pid()").first["n"].to_i
        return pids if open.zero?

        signal_all(pids, "CONT")
        sleep 0.02
      end
      raise "could not stop #{pids.size} idle processes outside a transaction"
    end

    def signal_all(pids, sig)
      pids.each do |pid|
        Process.kill(sig, pid)
      rescue Errno::ESRCH
        nil
      end
    end

    # --- child processes -------------------------------------------------------

    def spawn_child(*cmd, env: {}, **opts)
      pid = Process.spawn(env, *cmd, **opts)
      @children << pid
      pid
    end

    def stop_children
      @children.each { |pid| Bench.stop_process(pid, "TERM", timeout: 15) }
      @children.clear
    end

    def cpu_now(pids)
      Bench.tree_cpu_s(pids) + Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    end

    def wall = Time.now.to_f

    def result(steps:, seconds:, cpu_s:, p50:, p99:, **extra)
      { steps: steps, seconds: seconds, steps_per_s: steps / seconds, cpu_us_per_step: cpu_s * 1e6 / steps,
        latency_p50_ms: p50, latency_p99_ms: p99 }.merge(extra)
    end

    def read_line(io, prefix, timeout)
      deadline = Bench.clock + timeout
      loop do
        raise "timed out waiting for #{prefix.inspect}" if Bench.clock > deadline

        ready = IO.select([io], nil, nil, 1) or next
        line = ready.first.first.gets or raise "process ended before saying #{prefix.inspect}"
        return line.chomp if line.start_with?(prefix)
      end
    end

    # --- ours ------------------------------------------------------------------

    NAMES = Array.new(STEPS_PER_TASK) { |i| "step_#{i}" }.freeze
    TASK_SPEC = { name: "noop_x10", namespace: "bench", context: {} }.freeze

    # The benchmark's template (10 independent no-op steps), registered once
    # for the process: tasks are created through the public API,
    # TaskerCore.create_tasks, as an application would create them.
    def self.register_template
      registry = TaskerCore::TaskTemplateRegistry.new
      registry.register(TaskerCore::TaskTemplate.new({
                                                       "namespace" => "bench", "name" => "noop_x10", "version" => "1",
                                                       "steps" => NAMES.map { |n| { "name" => n, "handler" => "BenchHandlers::Noop" } }
                                                     }))
      TaskerCore.task_templates = registry
    end

    # The process's TaskerCore pool on url (the benchmark's database, or the
    # bulk-creation one).
    def use_database(url)
      return if @pool_url == url

      TaskerCore::Store.pool = TaskerCore::Store::Pool.new(url: url, size: 2, connect_timeout: 10)
      @pool_url = url
    end

    # Creates ntasks tasks of 10 independent no-op steps with
    # TaskerCore.create_tasks, CREATE_CHUNK per call (each call one
    # statement, its own transaction), so the orchestrator starts on the
    # first chunk while the rest are being created.
    #
    # With rate (steps/s), the tasks are created PACED_CHUNK at a time on a
    # schedule of that many steps per second instead: a steady offered load.
    PACED_CHUNK = 10 # tasks per call when paced (100 steps)

    def create_tasks(ntasks, rate: nil)
      use_database(@url)
      chunk = rate ? PACED_CHUNK : CREATE_CHUNK
      t0 = Bench.clock
      made = 0
      while made < ntasks
        if rate
          due = t0 + (made * STEPS_PER_TASK) / rate
          (d = due - Bench.clock).positive? && sleep(d)
        end
        k = [ntasks - made, chunk].min
        n = TaskerCore.create_tasks(Array.new(k, TASK_SPEC)).size
        raise "created #{n} tasks instead of #{k}" unless n == k

        made += k
      end
    end

    def start_ours
      batch_ep = "tcp://127.0.0.1:#{Bench.free_port}"
      result_ep = "tcp://127.0.0.1:#{Bench.free_port}"
      r, w = IO.pipe
      @orch_in_r, @orch_in_w = IO.pipe
      @orch_pid = spawn_child(Gem.ruby, File.join(E2E_DIR, "orchestrator.rb"), batch_ep, result_ep, @url,
                              WORKERS.to_s, in: @orch_in_r, out: w)
      w.close
      @orch_in_r.close
      @orch_out = r
      read_line(@orch_out, "ready", 60)
      @worker_pids = Array.new(WORKERS) do |i|
        spawn_child(Gem.ruby, File.join(Bench::ROOT, "exe", "tasker-worker"),
                    "--handlers", File.join(E2E_DIR, "noop_handlers.rb"), "--concurrency", WORKER_CONCURRENCY.to_s,
                    "--prefetch", WORKER_PREFETCH.to_s,
                    "--batch-endpoint", batch_ep, "--result-endpoint", result_ep, "--worker-id", "bench-w#{i + 1}",
                    env: { "TASKER_LOG_LEVEL" => "warn" }, out: File::NULL)
      end
      read_line(@orch_out, "workers", 60)
    end

    def stop_ours
      @orch_in_w&.close
      @orch_in_w = nil
      stop_children
      @orch_out&.close
      @orch_out = nil
    end

    def orchestrator_stats
      @orch_in_w.puts("stats")
      @orch_in_w.flush
      JSON.parse(read_line(@orch_out, "{", 30))
    end

    # One timed run of ours (the tasker tables must be free of unfinished
    # tasks; finished history may be there). Returns the result Hash.
    def run_ours(steps, rate: nil, timeout: 600)
      ntasks = steps / STEPS_PER_TASK
      first_new = @conn.exec("SELECT coalesce(max(id), 0) AS m FROM tasker_tasks").first["m"].to_i
      stats0 = orchestrator_stats
      if PROFILE
        @conn.exec("SELECT pg_stat_statements_reset()")
        profile = Bench::CpuProfile.new({ "database" => Bench.tree_pids([@postmaster]), "orchestrator" => [@orch_pid],
                                          "workers" => @worker_pids })
      end
      pids = [@postmaster, @orch_pid, *@worker_pids]
      groups = { "database" => [@postmaster], "orchestrator" => [@orch_pid], "workers" => @worker_pids }
      split0 = groups.transform_values { |g| Bench.tree_cpu_s(g) }
      driver0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
      cpu0 = cpu_now(pids)
      t0 = wall
      create_tasks(ntasks, rate: rate)
      created_s = wall - t0
      Bench.wait_until(timeout, "#{ntasks} tasks to finish", interval: 0.05) do
        @conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE state IN ('pending','in_progress')")
             .first["n"].to_i.zero?
      end
      cpu1 = cpu_now(pids)
      extra = PROFILE ? { top_statements: top_statements(ntasks * STEPS_PER_TASK), cpu_profile: profile.finish } : {}
      split = groups.to_h { |k, g| [k, ((Bench.tree_cpu_s(g) - split0[k]) * 1e6 / steps).round(1)] }
      split["creator"] =
        ((Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - driver0) * 1e6 / steps).round(1)
      row = @conn.exec(<<~SQL, [first_new]).first
        SELECT count(*) FILTER (WHERE state = 'complete') AS done, count(*) AS n,
               extract(epoch FROM max(finished_at))::float8 AS last
          FROM tasker_tasks WHERE id > $1
      SQL
      raise "only #{row['done']} of #{ntasks} tasks completed" unless row["done"].to_i == ntasks

      # Planned on the run's rows (with the statistics of the emptied table,
      # the self-join below is a nested loop: quadratic in the steps).
      @conn.exec("ANALYZE tasker_workflow_step_transitions")
      lat = @conn.exec(<<~SQL, [first_new]).first
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
          FROM (SELECT extract(epoch FROM c.created_at - e.created_at) * 1000 AS ms
                  FROM tasker_workflow_step_transitions c
                  JOIN tasker_workflow_step_transitions e
                    ON e.step_id = c.step_id AND e.attempt = c.attempt AND e.reason = 'claimed'
                 WHERE c.to_state = 'complete' AND c.task_id > $1) x
      SQL
      stats1 = orchestrator_stats
      loop_stats = diff_stats(stats0["loop"], stats1["loop"])
      result(steps: ntasks * STEPS_PER_TASK, seconds: row["last"].to_f - t0, cpu_s: cpu1 - cpu0,
             p50: lat["p50"]&.to_f, p99: lat["p99"]&.to_f, create_s: created_s,
             orchestrator_rss_kb: Bench.rss_kb(@orch_pid), orchestrator_hwm_kb: Bench.hwm_kb(@orch_pid),
             cpu_us_per_step_by_process: split, loop_stats: loop_stats, offered_steps_per_s: rate, **extra)
    end

    # --- creating tasks through the Ruby API ------------------------------------

    BULK_TASKS = 500
    BULK_DATABASE = "tasker_bench_bulk"

    # Creating BULK_TASKS tasks of 10 steps through the public API, in a
    # database of the same cluster that no orchestrator reads (so the
    # cluster's CPU is the creation's alone): one TaskerCore.create_tasks
    # call when the gem has it, else BULK_TASKS TaskerCore.create_task calls
    # one after another. Returns steps/s and the cluster's CPU per task.
    def run_bulk_create
      unless @bulk_url
        @conn.exec("CREATE DATABASE #{BULK_DATABASE}")
        @bulk_url = @url.sub(%r{/[^/?]+(\?|\z)}) { "/#{BULK_DATABASE}#{Regexp.last_match(1)}" }
        TaskerCore::Store.migrate!(@bulk_url)
      end
      use_database(@bulk_url)
      TaskerCore::Store.with_connection do |c|
        c.exec("TRUNCATE tasker_workflow_step_transitions, tasker_task_transitions, tasker_workflow_step_edges, " \
               "tasker_workflow_steps, tasker_tasks RESTART IDENTITY CASCADE")
        c.exec("VACUUM ANALYZE")
      end
      specs = Array.new(BULK_TASKS) { |i| { name: "noop_x10", namespace: "bench", context: { "i" => i } } }
      bulk = TaskerCore.respond_to?(:create_tasks)
      pg0 = Bench.tree_cpu_s([@postmaster])
      t0 = Bench.clock
      ids = bulk ? TaskerCore.create_tasks(specs) : specs.map { |t| TaskerCore.create_task(**t) }
      seconds = Bench.clock - t0
      pg_s = Bench.tree_cpu_s([@postmaster]) - pg0
      raise "created #{ids.size} tasks instead of #{BULK_TASKS}" unless ids.size == BULK_TASKS

      { api: bulk ? "TaskerCore.create_tasks (one call)" : "TaskerCore.create_task (one call per task)",
        steps_per_s: BULK_TASKS * STEPS_PER_TASK / seconds, seconds: seconds,
        db_cpu_ms_per_task: pg_s * 1e3 / BULK_TASKS }
    end

    def diff_stats(a, b)
      return b unless a.is_a?(Hash) && b.is_a?(Hash)

      b.to_h { |k, v| [k, v.is_a?(Numeric) && a[k].is_a?(Numeric) && !k.to_s.include?("latency") ? v - a[k] : v] }
    end

    # --- the SQL floor -----------------------------------------------------------

    FLOOR_SCHEMA = <<~SQL
      CREATE TABLE IF NOT EXISTS bench_jobs (
        id bigserial PRIMARY KEY,
        state text NOT NULL DEFAULT 'pending',
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        claimed_at timestamptz,
        completed_at timestamptz
      );
      CREATE INDEX IF NOT EXISTS bench_jobs_pending ON bench_jobs (id) WHERE state = 'pending';
    SQL

    # Two client processes (like our two workers) claim 100 with SKIP LOCKED
    # and complete with = ANY(ids), each statement its own transaction.
    def run_sql_floor(steps, keep_history: false, timeout: 600)
      FLOOR_SCHEMA.split(";").map(&:strip).reject(&:empty?).each { |s| @conn.exec(s) }
      @conn.exec("TRUNCATE bench_jobs") unless keep_history
      first_new = @conn.exec("SELECT coalesce(max(id), 0) AS m FROM bench_jobs").first["m"].to_i
      @conn.exec("VACUUM ANALYZE bench_jobs")
      clients = Array.new(WORKERS) do
        r, w = IO.pipe
        ir, iw = IO.pipe
        pid = spawn_child(Gem.ruby, File.join(E2E_DIR, "sql_floor_client.rb"), @url, in: ir, out: w)
        w.close
        ir.close
        { pid: pid, out: r, in: iw }
      end
      clients.each { |c| read_line(c[:out], "ready", 60) }
      pids = [@postmaster, *clients.map { |c| c[:pid] }]
      groups = { "database" => [@postmaster], "workers" => clients.map { |c| c[:pid] } }
      split0 = groups.transform_values { |g| Bench.tree_cpu_s(g) }
      driver0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
      cpu0 = cpu_now(pids)
      t0 = wall
      # Created in chunks like ours, while the clients already claim.
      clients.each { |c| c[:in].puts("go") && c[:in].flush }
      left = steps
      while left.positive?
        k = [left, CREATE_CHUNK * STEPS_PER_TASK].min
        @conn.exec("INSERT INTO bench_jobs (state) SELECT 'pending' FROM generate_series(1, $1)", [k])
        left -= k
      end
      clients.each { |c| c[:in].puts("drain") && c[:in].flush }
      clients.each { |c| read_line(c[:out], "done", timeout) }
      cpu1 = cpu_now(pids)
      split = groups.to_h { |k, g| [k, ((Bench.tree_cpu_s(g) - split0[k]) * 1e6 / steps).round(1)] }
      split["creator"] = ((Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - driver0) * 1e6 / steps).round(1)
      row = @conn.exec(<<~SQL, [first_new]).first
        SELECT count(*) FILTER (WHERE state = 'complete') AS done,
               extract(epoch FROM max(completed_at))::float8 AS last,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - claimed_at) * 1000) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - claimed_at) * 1000) AS p99
          FROM bench_jobs WHERE id > $1
      SQL
      raise "only #{row['done']} of #{steps} jobs completed" unless row["done"].to_i == steps

      clients.each do |c|
        c[:in].close
        Process.waitpid(c[:pid])
        @children.delete(c[:pid])
        c[:out].close
      end
      result(steps: steps, seconds: row["last"].to_f - t0, cpu_s: cpu1 - cpu0, p50: row["p50"]&.to_f,
             p99: row["p99"]&.to_f, cpu_us_per_step_by_process: split)
    end

    # --- Sidekiq -------------------------------------------------------------------

    # Sidekiq configurations measured side by side: name => [processes, queue].
    # Every process of every configuration is started once, up front; each
    # configuration has its own queue, so the idle ones only wait on Redis.
    SIDEKIQ_CONFIGS = { "1x10" => [1, "bench1"], "2x10" => [2, "bench2"] }.freeze

    def start_sidekiq
      require "sidekiq"
      @sidekiq_dir = Dir.mktmpdir("tasker_bench_sidekiq")
      @sidekiq_pids = {}
      SIDEKIQ_CONFIGS.each do |name, (procs, queue)|
        @sidekiq_pids[name] = Array.new(procs) do |i|
          log = File.join(@sidekiq_dir, "#{name}-#{i}.log")
          # A file, not a pipe: a pipe nobody reads would stall Sidekiq's logging.
          pid = spawn_child(Gem.ruby, "-S", "sidekiq", "-r", File.join(E2E_DIR, "sidekiq_app.rb"),
                            "-c", SIDEKIQ_THREADS.to_s, "-q", queue,
                            env: { "REDIS_URL" => redis_url, "BENCH_DONE_DIR" => @sidekiq_dir },
                            out: log, err: [:child, :out])
          Bench.wait_until(60, "Sidekiq to start (see #{log})", interval: 0.05) do
            raise "Sidekiq exited: #{File.read(log)[-2000..]}" if Process.waitpid(pid, Process::WNOHANG)

            File.read(log).include?("bench-sidekiq-ready")
          end
          pid
        end
      end
      Sidekiq.configure_client { |c| c.redis = { url: redis_url, size: 2 } }
      @sidekiq_run = 0
    end

    def stop_sidekiq
      (@sidekiq_pids || {}).values.flatten.each do |pid|
        Bench.stop_process(pid, "TERM", timeout: 30)
        @children.delete(pid)
      end
      @sidekiq_pids = nil
      FileUtils.rm_rf(@sidekiq_dir) if @sidekiq_dir
    end

    # One timed run of one configuration. The job's argument is the run's
    # id; the processes report their counts (sidekiq_app.rb), added up here.
    def run_sidekiq(steps, config, timeout: 600)
      _, queue = SIDEKIQ_CONFIGS.fetch(config)
      run = (@sidekiq_run += 1)
      sk_pids = @sidekiq_pids.fetch(config)
      pids = [@redis_pid, *sk_pids]
      groups = { "database" => [@redis_pid], "workers" => sk_pids }
      split0 = groups.transform_values { |g| Bench.tree_cpu_s(g) }
      driver0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
      cpu0 = cpu_now(pids)
      t0 = wall
      left = steps
      while left.positive?
        k = [left, 1000].min
        Sidekiq::Client.push_bulk("class" => "BenchNoopJob", "queue" => queue, "args" => Array.new(k) { [run] })
        left -= k
      end
      created_s = wall - t0
      reports = lambda do
        sk_pids.filter_map do |pid|
          f = File.join(@sidekiq_dir, "#{pid}.json")
          doc = File.exist?(f) && JSON.parse(File.read(f))
          doc if doc && doc["run"] == run
        end
      end
      Bench.wait_until(timeout, "#{steps} Sidekiq jobs", interval: 0.05) { reports.call.sum { |d| d["jobs"] } >= steps }
      cpu1 = cpu_now(pids)
      split = groups.to_h { |k, g| [k, ((Bench.tree_cpu_s(g) - split0[k]) * 1e6 / steps).round(1)] }
      split["creator"] =
        ((Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - driver0) * 1e6 / steps).round(1)
      docs = Bench.wait_until(30, "the Sidekiq processes' latencies", interval: 0.05) do
        d = reports.call
        d if d.all? { |x| x["lat"]&.size == x["jobs"] }
      end
      jobs = docs.sum { |d| d["jobs"] }
      raise "Sidekiq ran #{jobs} of #{steps} jobs" unless jobs == steps

      lat = docs.flat_map { |d| d["lat"] }.sort
      result(steps: steps, seconds: docs.map { |d| d["last"] }.max - t0, cpu_s: cpu1 - cpu0,
             p50: Bench.quantile(lat, 0.5), p99: Bench.quantile(lat, 0.99), create_s: created_s,
             cpu_us_per_step_by_process: split, jobs_by_process: docs.map { |d| d["jobs"] })
    end

    # --- ActiveJob on PostgreSQL: GoodJob and Solid Queue --------------------------------

    PEER_PROCESSES = Integer(ENV.fetch("E2E_PEER_PROCESSES", "2"))
    PEER_THREADS = Integer(ENV.fetch("E2E_PEER_THREADS", "10"))
    BENCH_DIR = File.expand_path("..", __dir__)

    # Each runs under its own bundle (bench/<dir>/Gemfile: Rails, pg and the
    # peer's gem, locked), in the same private cluster and database: an
    # enqueuer process (creates the peer's schema, enqueues in bulk: the
    # driver's part, bench/<dir>/enqueuer.rb) and the peer's own processes,
    # PEER_PROCESSES x PEER_THREADS. Finished jobs are kept, so completion is
    # read from the peer's jobs table.
    #   worker, starts: command (in bench/<dir>) and how many of it to start
    #   live_sql: how many of its working processes have registered
    #   done_sql: its finished jobs; truncate: its tables, emptied before each run
    #   latency:  claim-to-complete per job in ms as SQL, or nil when the
    #             peer keeps no claim time
    ACTIVEJOB_PEERS = {
      "goodjob" => {
        dir: "goodjob", starts: PEER_PROCESSES,
        worker: ["worker.rb", "start", "--queues=bench", "--max-threads=#{PEER_THREADS}"],
        env: { "GOOD_JOB_ENABLE_CRON" => "false" },
        live_sql: "SELECT count(*) AS n FROM good_job_processes",
        done_sql: "SELECT count(*) AS n FROM good_jobs WHERE finished_at IS NOT NULL AND error IS NULL",
        truncate: %w[good_jobs good_job_executions], jobs: "good_jobs",
        latency: "extract(epoch FROM finished_at - performed_at) * 1000"
      },
      "solidqueue" => {
        dir: "solidqueue", starts: 1, # the supervisor forks the workers and the dispatcher
        worker: ["bin/jobs"],
        env: { "SOLID_QUEUE_PROCESSES" => PEER_PROCESSES.to_s, "SOLID_QUEUE_THREADS" => PEER_THREADS.to_s },
        live_sql: "SELECT count(*) AS n FROM solid_queue_processes WHERE kind = 'Worker'",
        done_sql: "SELECT count(*) AS n FROM solid_queue_jobs WHERE finished_at IS NOT NULL",
        truncate: %w[solid_queue_jobs solid_queue_ready_executions solid_queue_claimed_executions
                     solid_queue_failed_executions],
        jobs: "solid_queue_jobs", latency: nil
      },
      # ActiveJob on tasker_core (the adapter :tasker_core): one orchestrator
      # (before:) and PEER_PROCESSES `tasker worker` x PEER_THREADS, in a
      # database of their own (database:), so that ours' orchestrator never
      # claims these jobs' steps nor theirs ours; endpoints: free TCP ports.
      "taskeraj" => {
        dir: "activejob_tasker", starts: PEER_PROCESSES, database: "tasker_activejob", endpoints: true,
        libpq_url: true, # no ActiveRecord: the URL goes to libpq, which takes no pool= parameter
        before: [["worker.rb", "orchestrator", "--stats-interval", "0"]],
        worker: ["worker.rb", "worker", "--queues", "bench", "--concurrency", PEER_THREADS.to_s],
        env: { "TASKER_LOG_LEVEL" => "warn" },
        live_sql: "SELECT count(*) AS n FROM tasker_workers WHERE connected",
        done_sql: "SELECT count(*) AS n FROM tasker_tasks WHERE namespace = 'active_job' AND state = 'complete'",
        truncate: %w[tasker_workflow_step_transitions tasker_task_transitions tasker_workflow_step_edges
                     tasker_workflow_steps tasker_tasks],
        jobs: "tasker_tasks", latency: nil
      }
    }.freeze

    def peer_env(peer, st)
      dir = File.join(BENCH_DIR, peer[:dir])
      { "BUNDLE_GEMFILE" => File.join(dir, "Gemfile"), "RUBYOPT" => "-rbundler/setup",
        "DATABASE_URL" => peer[:libpq_url] ? st[:url] : "#{st[:url]}?pool=#{PEER_THREADS + 5}", "RAILS_ENV" => "production" }
        .merge(peer[:env]).merge(st[:env])
    end

    # The peer's database: the benchmark's, or one of its own in the same cluster.
    def peer_database(peer, st)
      st[:url] = @url
      st[:env] = {}
      if peer[:endpoints]
        st[:env] = { "TASKER_BATCH_ENDPOINT" => "tcp://127.0.0.1:#{Bench.free_port}",
                     "TASKER_RESULT_ENDPOINT" => "tcp://127.0.0.1:#{Bench.free_port}" }
      end
      return unless peer[:database]

      @conn.exec("CREATE DATABASE #{peer[:database]}") if @conn.exec("SELECT 1 FROM pg_database WHERE datname = $1",
                                                                     [peer[:database]]).none?
      st[:url] = @url.sub(%r{/[^/?]+(\?|\z)}) { "/#{peer[:database]}#{Regexp.last_match(1)}" }
      st[:conn] = TaskerCore::Store::Connection.new(st[:url], connect_timeout: 10)
    end

    def start_activejob_peer(name)
      peer = ACTIVEJOB_PEERS.fetch(name)
      dir = File.join(BENCH_DIR, peer[:dir])
      @peers ||= {}
      st = @peers[name] = { log: File.join(Dir.tmpdir, "tasker_bench_#{name}_#{Process.pid}.log") }
      peer_database(peer, st)
      conn = st[:conn] || @conn
      r, w = IO.pipe
      ir, iw = IO.pipe
      st[:enqueuer] = spawn_child(Gem.ruby, File.join(dir, "enqueuer.rb"), env: peer_env(peer, st), chdir: dir,
                                                                            in: ir, out: w, err: st[:log])
      w.close
      ir.close
      st[:out] = r
      st[:in] = iw
      read_line(st[:out], "ready", 120)
      commands = (peer[:before] || []) + Array.new(peer[:starts]) { peer[:worker] }
      st[:pids] = commands.map do |command|
        cmd = command.dup
        cmd[0] = File.join(dir, cmd[0])
        spawn_child(Gem.ruby, *cmd, env: peer_env(peer, st), chdir: dir, out: st[:log], err: [:child, :out])
      end
      Bench.wait_until(120, "#{name}'s processes (see #{st[:log]})", interval: 0.1) do
        st[:pids].each { |pid| raise "#{name} exited: #{File.read(st[:log])[-2000..]}" if Process.waitpid(pid, Process::WNOHANG) }
        conn.exec(peer[:live_sql]).first["n"].to_i >= PEER_PROCESSES
      end
    end

    def stop_activejob_peers
      (@peers || {}).each_value do |st|
        st[:in]&.close
        [st[:enqueuer], *st[:pids]].compact.each do |pid|
          Bench.stop_process(pid, "TERM", timeout: 30)
          @children.delete(pid)
        end
        st[:out]&.close
        st[:conn]&.close
        File.delete(st[:log]) if File.exist?(st[:log]) && !ENV["BENCH_KEEP_LOGS"]
      end
      @peers = {}
    end

    # One timed run of one ActiveJob peer. CPU: the cluster, the peer's
    # processes (and what they fork), and the enqueuer.
    def run_activejob_peer(name, steps, timeout: 600)
      peer = ACTIVEJOB_PEERS.fetch(name)
      st = @peers.fetch(name)
      conn = st[:conn] || @conn
      conn.exec("TRUNCATE #{peer[:truncate].join(', ')} CASCADE")
      peer[:truncate].each { |t| conn.exec("VACUUM ANALYZE #{t}") }
      pids = [@postmaster, st[:enqueuer], *st[:pids]]
      groups = { "database" => [@postmaster], "workers" => st[:pids], "creator" => [st[:enqueuer]] }
      split0 = groups.transform_values { |g| Bench.tree_cpu_s(g) }
      cpu0 = cpu_now(pids)
      t0 = wall
      st[:in].puts("enqueue #{steps}")
      st[:in].flush
      read_line(st[:out], "enqueued", timeout)
      created_s = wall - t0
      Bench.wait_until(timeout, "#{steps} #{name} jobs", interval: 0.05) do
        conn.exec(peer[:done_sql]).first["n"].to_i >= steps
      end
      cpu1 = cpu_now(pids)
      split = groups.to_h { |k, g| [k, ((Bench.tree_cpu_s(g) - split0[k]) * 1e6 / steps).round(1)] }
      done = conn.exec(peer[:done_sql]).first["n"].to_i
      raise "only #{done} of #{steps} #{name} jobs succeeded" unless done == steps

      lat = peer[:latency] || "NULL::float8"
      row = conn.exec(<<~SQL).first
        SELECT extract(epoch FROM max(finished_at))::float8 AS last,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY #{lat}) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY #{lat}) AS p99
          FROM #{peer[:jobs]}
      SQL
      result(steps: steps, seconds: row["last"].to_f - t0, cpu_s: cpu1 - cpu0, p50: row["p50"]&.to_f,
             p99: row["p99"]&.to_f, create_s: created_s, cpu_us_per_step_by_process: split)
    end
  end
end
