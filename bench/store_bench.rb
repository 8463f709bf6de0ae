# frozen_string_literal: true

# Store-only benchmark: the SQL functions the orchestration loop calls, driven
# from one Ruby connection with no messaging, so the store's own cost per step
# is measured alone.
#
#   drain:      N steps (tasks of 10 independent steps) created first, then
#               tasker_claim_steps(100) -> tasker_mark_dispatched ->
#               tasker_apply_results(success) until nothing is left.
#   concurrent: the same drain loop while a second connection (a thread)
#               creates the tasks in statements of 100 tasks (as bench e2e
#               does); the loop keeps going until every task is complete.
#   create_tasks: N steps created through TaskerCore.create_tasks, calls of
#               500 tasks (STORE_CREATE_BATCH) of 10 steps; nothing drained.
#   create_task:  N steps created through TaskerCore.create_task, one task
#               per call, from STORE_CREATE_THREADS threads (1); nothing drained.
#   drain_v2:   as drain, with the loop's claim (tasker_claim_queued, claimed
#               straight to in_progress, every column the loop reads) and no
#               tasker_mark_dispatched (concurrent too; drain keeps the claim
#               of older orchestrators). STORE_BATCH steps per claim (100).
#
# The create modes report the cluster's CPU per step and per task (the
# calling Ruby process is not counted).
#
# Reports steps/s, the CPU of the draining backend per step (utime+stime of
# its process, from /proc) and of the whole cluster per step (postmaster
# tree: both backends, autovacuum, WAL writer, checkpointer), and for
# "concurrent" how long creation took. Private cluster (EmbeddedPostgres) in
# a temp dir, fsync and synchronous_commit on.
#
#   ruby bench/store_bench.rb                          # both modes, STORE_STEPS=20000, 5 repeats
#   STORE_STEPS=5000 STORE_MODES=drain ruby bench/store_bench.rb
#   STORE_PROFILE=1 ruby bench/store_bench.rb          # + pg_stat_statements (track=all) top statements
#   STORE_WRITE=0                                      # do not write bench/results/store.json
#   STORE_BASELINE_JSON=f STORE_BASELINE_NAME=n        # add the rows of an earlier run as contender n

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require_relative "lib/harness"
require "tasker_core"
require "tmpdir"
require "fileutils"
require "json"

module Bench
  class Store
    STEPS_PER_TASK = 10
    CREATE_CHUNK = 100
    BATCH = Integer(ENV.fetch("STORE_BATCH", "100"))
    NAMES = Array.new(STEPS_PER_TASK) { |i| "step_#{i}" }.freeze
    CREATE_SQL = <<~SQL
      SELECT count(*) AS n FROM (
        SELECT tasker_create_task('bench', 'noop_x10', '1', '{"steps":10}'::jsonb, '\\x80'::bytea, NULL,
          $2::text[], $3::text[], $4::bytea[], $5::int[], $6::boolean[], $7::int[], $8::int[], $9::int[],
          $10::float8[], '{}'::text[], '{}'::text[]) AS t
          FROM generate_series(1, $1) AS g) x
    SQL
    CLAIM_SQL = "SELECT step_id, attempt FROM tasker_claim_steps($1, $2::int, $3::int)"
    # The loop's claim: every column it reads, the queue 'default' with room for the whole batch.
    CLAIM_V2_SQL = "SELECT step_id, task_id, step_name, handler, handler_config, attempt, timeout_ms, context, " \
                   "dep_names, dep_outputs, lost_attempts, queue " \
                   "FROM tasker_claim_queued($1, $3::int, 'in_progress', 2, 0, $2::int, '{default}', ARRAY[$2::int], " \
                   "'{}', '{}')"
    CREATE_MODES = %w[create_tasks create_task].freeze
    MARK_SQL = "SELECT tasker_mark_dispatched($1::bigint[], $2::int[]) AS n"
    APPLY_SQL = "SELECT applied, stale FROM tasker_apply_results($1::bigint[], $2::int[], $3::boolean[], " \
                "$4::bytea[], $5::bytea[], $6::boolean[], $7::int[])"
    UNFINISHED_SQL = "SELECT count(*) AS n FROM tasker_tasks WHERE state IN ('pending', 'in_progress')"

    attr_reader :settings, :conn

    def initialize(profile: false)
      @profile = profile
      reset_timings
    end

    # Wall time per SQL call, reported by #run; cleared for each measured run.
    def reset_timings
      @call_s = Hash.new(0.0)
    end

    def start
      @dir = Dir.mktmpdir("tasker_store_bench")
      File.chmod(0o755, @dir)
      @url = TaskerCore::EmbeddedPostgres.start(dir: @dir, database: "tasker_store_bench")
      if @profile
        TaskerCore::EmbeddedPostgres.stop(dir: @dir)
        conf = File.join(@dir, "data", "postgresql.conf")
        File.open(conf, "a") do |f|
          f.puts "shared_preload_libraries = 'pg_stat_statements'"
          f.puts "pg_stat_statements.track = all"
        end
        @url = TaskerCore::EmbeddedPostgres.start(dir: @dir, database: "tasker_store_bench")
      end
      TaskerCore::Store.migrate!(@url)
      @conn = connect
      @conn.exec("CREATE EXTENSION IF NOT EXISTS pg_stat_statements") if @profile
      @settings = @conn.exec("SELECT name, setting FROM pg_settings WHERE name IN " \
                             "('synchronous_commit','fsync','shared_buffers','wal_sync_method')")
                       .to_h { |r| [r["name"], r["setting"]] }
      raise "needs synchronous_commit and fsync on, got #{@settings}" unless
        @settings["synchronous_commit"] == "on" && @settings["fsync"] == "on"

      @postmaster = File.read(File.join(@dir, "data", "postmaster.pid")).to_i
      # TaskerCore.create_task(s) on this cluster, with a template of 10 independent no-op steps.
      ENV["DATABASE_URL"] = @url
      TaskerCore.configure
      TaskerCore.task_templates = TaskerCore::TaskTemplateRegistry.new.tap do |r|
        r.register(TaskerCore::TaskTemplate.new({
                     "name" => "noop_x10", "namespace" => "bench",
                     "steps" => NAMES.map { |n| { "name" => n, "handler" => "BenchHandlers::Noop" } }}
                   ))
      end
      @backend = @conn.exec("SELECT pg_backend_pid() AS p").first["p"]
    end

    def stop
      @conn&.close
      TaskerCore::EmbeddedPostgres.stop(dir: @dir) if @dir
      FileUtils.rm_rf(@dir) if @dir
    end

    def connect = TaskerCore::Store::Connection.new(@url, connect_timeout: 10)

    def reset
      @conn.exec("TRUNCATE tasker_workflow_step_transitions, tasker_task_transitions, tasker_workflow_step_edges, " \
                 "tasker_workflow_steps, tasker_tasks RESTART IDENTITY CASCADE")
      @conn.exec("VACUUM ANALYZE")
      @conn.exec("SELECT pg_stat_statements_reset()") if @profile
    end

    def create_params(ntasks)
      n = STEPS_PER_TASK
      [ntasks, NAMES, Array.new(n, "BenchHandlers::Noop"), Array.new(n, TaskerCore::Codec.pack({})),
       Array.new(n, 30_000), Array.new(n, true), Array.new(n, 3), Array.new(n, 500), Array.new(n, 30_000),
       Array.new(n, 0.2)]
    end

    def create_tasks(conn, ntasks)
      left = ntasks
      while left.positive?
        k = [left, CREATE_CHUNK].min
        n = conn.exec(CREATE_SQL, create_params(k)).first["n"].to_i
        raise "created #{n} tasks instead of #{k}" unless n == k

        left -= k
      end
    end

    def backend_cpu_s
      _, own, = Bench.proc_stat(@backend)
      own / CLK_TCK
    end

    # One claim -> mark_dispatched -> apply_results round; returns the steps done.
    def timed(what)
      t = Bench.clock
      r = yield
      @call_s[what] += Bench.clock - t
      r
    end

    def round(owner, direct: false)
      rows = timed("claim") { @conn.exec(direct ? CLAIM_V2_SQL : CLAIM_SQL, [owner, BATCH, 10_000]) }
      return 0 if rows.empty?

      ids = rows.map { |r| r["step_id"] }
      attempts = rows.map { |r| r["attempt"] }
      timed("mark_dispatched") { @conn.exec(MARK_SQL, [ids, attempts]) } unless direct
      n = ids.size
      r = timed("apply_results") do
        @conn.exec(APPLY_SQL, [ids, attempts, Array.new(n, true), Array.new(n, "\x80".b), Array.new(n, nil),
                               Array.new(n, true), Array.new(n, nil)]).first
      end
      raise "applied #{r['applied']} of #{n}" unless r["applied"] == n

      n
    end

    # Through the Ruby API: create_tasks in calls of `batch` tasks, or
    # create_task one task per call. Returns the result Hash of one run.
    def run_create(mode, steps)
      reset
      ntasks = steps / STEPS_PER_TASK
      batch = Integer(ENV.fetch("STORE_CREATE_BATCH", "500"))
      entry = { name: "noop_x10", namespace: "bench", context: { "order_id" => 1 } }
      cluster0 = Bench.tree_cpu_s([@postmaster])
      t0 = Bench.clock
      calls = 0
      if mode == "create_tasks"
        left = ntasks
        while left.positive?
          k = [left, batch].min
          ids = TaskerCore.create_tasks(Array.new(k) { entry })
          raise "created #{ids.compact.size} tasks instead of #{k}" unless ids.compact.size == k

          left -= k
          calls += 1
        end
      else
        threads = Integer(ENV.fetch("STORE_CREATE_THREADS", "1"))
        Array.new(threads) { |k| Thread.new { (ntasks / threads + (k < ntasks % threads ? 1 : 0)).times { TaskerCore.create_task(**entry) } } }
             .each(&:join)
        calls = ntasks
      end
      seconds = Bench.clock - t0
      cluster = Bench.tree_cpu_s([@postmaster]) - cluster0
      n = @conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps").first["n"]
      raise "#{n} steps instead of #{steps}" unless n == steps

      { "mode" => mode, "steps" => steps, "tasks" => ntasks, "calls" => calls, "seconds" => seconds.round(3),
        "steps_per_s" => (steps / seconds).round(1), "tasks_per_s" => (ntasks / seconds).round(1),
        "cluster_cpu_us_per_step" => (cluster * 1e6 / steps).round(1),
        "cluster_cpu_us_per_task" => (cluster * 1e6 / ntasks).round(1) }
    end

    # mode: "drain", "drain_v2" or "concurrent". Returns the result Hash of one run.
    def run(mode, steps)
      return run_create(mode, steps) if CREATE_MODES.include?(mode)

      reset
      reset_timings
      ntasks = steps / STEPS_PER_TASK
      create_s = nil
      direct = mode != "drain" # the loop's claim; drain keeps the version 1 claim of older orchestrators
      if mode != "concurrent"
        t = Bench.clock
        create_tasks(@conn, ntasks)
        create_s = Bench.clock - t
        @conn.exec("ANALYZE") if ENV["STORE_ANALYZE"] == "1"
      end
      cluster0 = Bench.tree_cpu_s([@postmaster])
      backend0 = backend_cpu_s
      t0 = Bench.clock
      creator = nil
      if mode == "concurrent"
        creator = Thread.new do
          c = connect
          begin
            t = Bench.clock
            create_tasks(c, ntasks)
            Bench.clock - t
          ensure
            c.close
          end
        end
      end
      done = 0
      rounds = 0
      empty = 0
      loop do
        n = round("bench-store", direct: direct)
        done += n
        rounds += 1 if n.positive?
        next if n.positive?
        break if creator.nil? || !creator.alive?

        empty += 1
        sleep 0.001 # the creator has not committed the next chunk yet
      end
      create_s = creator.value if creator
      done += round("bench-store", direct: direct) while @conn.exec(UNFINISHED_SQL).first["n"].positive? &&
                                         (creator || done < steps)
      seconds = Bench.clock - t0
      backend = backend_cpu_s - backend0
      cluster = Bench.tree_cpu_s([@postmaster]) - cluster0
      raise "completed #{done} of #{steps} steps" unless done == steps
      raise "unfinished tasks left" unless @conn.exec(UNFINISHED_SQL).first["n"].zero?

      { "mode" => mode, "steps" => steps, "seconds" => seconds.round(3), "steps_per_s" => (steps / seconds).round(1),
        "drain_backend_cpu_us_per_step" => (backend * 1e6 / steps).round(1),
        "cluster_cpu_us_per_step" => (cluster * 1e6 / steps).round(1),
        "create_s" => create_s&.round(3), "rounds" => rounds, "empty_claims" => empty,
        "wall_us_per_step_by_call" => @call_s.transform_values { |v| (v * 1e6 / steps).round(1) } }
    end

    def top_statements(limit = 15)
      @conn.exec(<<~SQL, [limit]).to_a
        SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
               round((total_exec_time / greatest(calls, 1))::numeric, 3) AS ms_per_call,
               rows, shared_blks_hit, shared_blks_read, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
          FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT $1
      SQL
    end
  end
end

if $PROGRAM_NAME == __FILE__
  steps = Integer(ENV.fetch("STORE_STEPS", "20000"))
  repeats = Integer(ENV.fetch("BENCH_REPEATS", "5"))
  modes = ENV.fetch("STORE_MODES", "drain,concurrent").split(",")
  profile = ENV["STORE_PROFILE"] == "1"
  bench = Bench::Store.new(profile: profile)
  bench.start
  runs = Hash.new { |h, k| h[k] = [] }
  begin
    repeats.times do |i|
      modes.each do |mode|
        r = bench.run(mode, steps)
        runs[mode] << r
        if Bench::Store::CREATE_MODES.include?(mode)
          puts format("%-12s run %d: %8.1f steps/s %8.1f tasks/s  cluster %7.1f µs/step %8.1f µs/task  (%d calls)",
                      mode, i + 1, r["steps_per_s"], r["tasks_per_s"], r["cluster_cpu_us_per_step"],
                      r["cluster_cpu_us_per_task"], r["calls"])
          next
        end
        puts format("%-10s run %d: %8.1f steps/s  drain backend %7.1f µs/step  cluster %7.1f µs/step  create %s s",
                    mode, i + 1, r["steps_per_s"], r["drain_backend_cpu_us_per_step"], r["cluster_cpu_us_per_step"],
                    r["create_s"].inspect)
        puts "           wall µs/step by call: #{r['wall_us_per_step_by_call']}"
        next unless profile

        bench.top_statements.each do |s|
          puts format("  %6d calls %10.1f ms %9.3f ms/call %8d rows hit %9d read %6d  %s", s["calls"], s["total_ms"],
                      s["ms_per_call"], s["rows"], s["shared_blks_hit"], s["shared_blks_read"], s["query"])
        end
      end
    end
  ensure
    bench.stop
  end

  contender = ENV.fetch("STORE_CONTENDER", "ours")
  rows = runs.flat_map do |mode, rs|
    label = "#{steps} steps, #{mode}"
    if Bench::Store::CREATE_MODES.include?(mode)
      next [Bench.row(label: label, contender: contender, metric: "steps/s", unit: "steps/s",
                      samples: rs.map { |r| r["steps_per_s"] }, runs: rs),
            Bench.row(label: label, contender: contender, metric: "cluster CPU per task", unit: "µs",
                      samples: rs.map { |r| r["cluster_cpu_us_per_task"] })]
    end
    [Bench.row(label: label, contender: contender, metric: "steps/s", unit: "steps/s",
               samples: rs.map { |r| r["steps_per_s"] }, runs: rs),
     Bench.row(label: label, contender: contender, metric: "draining backend CPU per step", unit: "µs",
               samples: rs.map { |r| r["drain_backend_cpu_us_per_step"] }),
     Bench.row(label: label, contender: contender, metric: "cluster CPU per step", unit: "µs",
               samples: rs.map { |r| r["cluster_cpu_us_per_step"] })]
  end
  rows.each { |r| Bench.print_row(r) }
  # STORE_BASELINE_JSON=path: the rows of an earlier run (another revision of
  # the SQL, run with this harness) join the file as contender STORE_BASELINE_NAME.
  if (base = ENV["STORE_BASELINE_JSON"])
    name = ENV.fetch("STORE_BASELINE_NAME", "before")
    rows += JSON.parse(File.read(base))["rows"].map { |r| r.merge("contender" => name) }
  end
  unless ENV["STORE_WRITE"] == "0" || profile
    Bench.write_result(ENV.fetch("STORE_RESULT_NAME", "store"),
                       parameters: { "steps" => steps, "repeats" => repeats, "modes" => modes,
                                     "steps_per_task" => Bench::Store::STEPS_PER_TASK,
                                     "claim_batch" => Bench::Store::BATCH,
                                     "create_chunk_tasks" => Bench::Store::CREATE_CHUNK,
                                     "postgresql_settings" => bench.settings },
                       rows: rows)
  end
end
