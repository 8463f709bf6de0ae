# frozen_string_literal: true

# Dashboard benchmark: the server time of each TaskerCore::Web page (and of
# /metrics) with WEB_STEPS finished steps stored (default 1,000,000: 100,000
# tasks of 10 chained steps, 2% of them in error, created over 14 days; three
# transitions per step, the last hour's at a steady rate) plus 1,000 unfinished
# tasks and 20 live workers. Rows are written by set-based SQL, not by running
# the steps: the page queries are what is measured.
#
# Each page is requested in-process through Rack::MockRequest (no HTTP, no
# browser: server time), WEB_REPEATS times after one warm-up; the target is
# a median of at most 200 ms per page. /metrics is measured three ways: with
# nothing new since the last scrape, with 30,000 step transitions logged
# since (10,000 steps run again), and with the whole log unread (a fresh set
# of step counters from id 0: what the per-scrape bound costs). The overview
# is measured a second time without migration 0007's index. Private cluster
# (EmbeddedPostgres).
#
#   ruby bench/web_bench.rb                 # writes bench/results/web.json
#   WEB_STEPS=100000 WEB_WRITE=0 ruby bench/web_bench.rb

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require_relative "lib/harness"
require "tasker_core"
require "tasker_core/web"
require "tmpdir"
require "fileutils"

module Bench
  class Web
    STEPS_PER_TASK = 10
    TARGET_MS = 200

    def initialize
      @steps = Integer(ENV.fetch("WEB_STEPS", "1000000"))
      @tasks = @steps / STEPS_PER_TASK
      @repeats = Integer(ENV.fetch("WEB_REPEATS", "7"))
    end

    def run
      dir = Dir.mktmpdir("tasker_web_bench")
      File.chmod(0o755, dir)
      url = TaskerCore::EmbeddedPostgres.start(dir: dir, database: "tasker_web_bench")
      TaskerCore::Store.migrate!(url)
      TaskerCore::Store.pool = TaskerCore::Store::Pool.new(url: url, size: 2, connect_timeout: 5)
      seed_s = timed { seed }
      puts "seeded #{@steps} finished steps in #{seed_s.round(1)} s"
      rows = pages.map { |label, path| measure(label, path) }
      rows.concat(metrics_catching_up)
      # The overview again without migration 0007's BRIN index on the transitions.
      sql("DROP INDEX tasker_workflow_step_transitions_created_brin")
      rows << measure("overview", "/", contender: "without_created_at_brin")
      rows.each { |r| Bench.print_row(r) }
      slow = rows.select { |r| r["contender"] == "ours" && r["median"] > TARGET_MS }
      puts slow.empty? ? "every page within #{TARGET_MS} ms (median)" : "over #{TARGET_MS} ms: #{slow.map { |r| r['label'] }.join(', ')}"
      return if ENV["WEB_WRITE"] == "0"

      Bench.write_result("web", parameters: { "finished_steps" => @steps, "tasks" => @tasks + 1000,
                                              "steps_per_task" => STEPS_PER_TASK, "repeats" => @repeats,
                                              "target_ms" => TARGET_MS, "seed_s" => seed_s.round(1) },
                                rows: rows)
    ensure
      TaskerCore::Store.disconnect!
      TaskerCore::EmbeddedPostgres.stop(dir: dir) if dir
      FileUtils.rm_rf(dir) if dir
    end

    private

    def timed
      t = Bench.clock
      yield
      Bench.clock - t
    end

    def pages
      id = sql("SELECT id FROM tasker_tasks WHERE state = 'error' ORDER BY id DESC LIMIT 1 OFFSET 50").first["id"]
      mid = sql("SELECT id FROM tasker_tasks ORDER BY id LIMIT 1 OFFSET $1", [@tasks / 2]).first["id"]
      [
        ["overview", "/"],
        ["tasks", "/tasks"],
        ["tasks page from the middle", "/tasks?before=#{mid}"],
        ["tasks state=error", "/tasks?state=error"],
        ["tasks state=error page 2", "/tasks?state=error&before=#{id}"],
        ["tasks state=pending", "/tasks?state=pending"],
        ["tasks namespace+name", "/tasks?namespace=bench&name=other"],
        ["tasks created range (old)", "/tasks?created_from=#{day(13)}&created_to=#{day(12)}"],
        ["tasks identity key", "/tasks?identity_key=order-#{@tasks / 3}"],
        ["task page (10 steps)", "/tasks/#{id}"],
        ["workers", "/workers"],
        ["metrics", "/metrics"]
      ]
    end

    def day(n) = (Time.now.utc - n * 86_400).strftime("%Y-%m-%dT%H:%M:%SZ")

    # /metrics when the step counters have transitions to read: 30,000 logged
    # since the last scrape (10,000 steps run), and a long pause (the
    # whole log unread: the per-scrape bound at work).
    def metrics_catching_up
      counters = TaskerCore::Web::Metrics
      behind = []
      recent = measure("metrics, 30,000 transitions since the last scrape", "/metrics",
                       before: -> { log_runs(10_000) },
                       after: ->(body) { behind << body[/^tasker_step_transitions_behind (\d+)/, 1].to_i })
      recent["behind_after"] = behind.dup
      behind.clear
      paused = measure("metrics, whole log unread (a long pause)", "/metrics",
                       before: -> { counters.step_counters = counters::StepCounters.new(buckets: counters::LATENCY_BUCKETS, from_id: 0) },
                       after: ->(body) { behind << body[/^tasker_step_transitions_behind (\d+)/, 1].to_i })
      paused["behind_after"] = behind
      counters.step_counters = nil
      [recent, paused]
    end

    # Logs a first attempt (claim, dispatch, result) of n steps, as the functions do.
    def log_runs(n)
      sql(<<~SQL, [n])
        INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason)
        SELECT s.id, s.task_id, x.f, x.t, 1, x.o, x.r
          FROM (SELECT id, task_id, attempts FROM tasker_workflow_steps
                 WHERE id >= (SELECT floor(random() * 900000)::bigint) ORDER BY id LIMIT $1) s,
               LATERAL (VALUES (1, 'pending', 'enqueued', 'orch-1', 'claimed'), (2, 'enqueued', 'in_progress', NULL, 'dispatched'),
                               (3, 'in_progress', 'complete', NULL, 'result')) x(k, f, t, o, r)
         ORDER BY s.id, x.k
      SQL
    end

    def measure(label, path, contender: "ours", before: nil, after: nil)
      app = Rack::MockRequest.new(TaskerCore::Web.new)
      check = app.get(path)
      raise "#{path}: HTTP #{check.status}: #{check.body[0, 300]}" unless check.status == 200

      samples = Array.new(@repeats) do
        before&.call
        t = Bench.clock
        res = app.get(path)
        ms = (Bench.clock - t) * 1000
        raise "#{path}: HTTP #{res.status}" unless res.status == 200

        after&.call(res.body)
        ms
      end
      Bench.row(label: label, contender: contender, metric: "server_time", unit: "ms", samples: samples.map { |s| s.round(2) },
                path: path, bytes: check.body.bytesize)
    end

    def sql(text, params = [])
      TaskerCore::Store.with_connection { |c| c.exec(text, params).to_a }
    end

    # Finished work written directly (the functions' rows, not their path).
    def seed
      error = TaskerCore::Codec.pack({ "class" => "Bench::Failure", "message" => "card declined",
                                       "backtrace" => Array.new(8) { |i| "app/handlers/charge.rb:#{i + 10}:in `call'" } })
      output = TaskerCore::Codec.pack({ "ok" => true, "id" => 12_345, "note" => "x" * 40 })
      TaskerCore::Store.with_connection do |c|
        c.exec("SET synchronous_commit = off")
        c.exec(<<~SQL)
          INSERT INTO tasker_task_templates (namespace, name, version, definition)
          VALUES ('bench', 'chain10', '1', '{}'), ('bench', 'other', '1', '{}')
        SQL
        # tasks: created over 14 days (id order), 2% error, the rest complete; finished 30 s later
        c.exec(<<~SQL, [@tasks, STEPS_PER_TASK])
          INSERT INTO tasker_tasks (template_id, namespace, name, version, state, context, identity_key,
                                    step_count, remaining_steps, created_at, updated_at, finished_at)
          SELECT CASE WHEN g % 10 = 0 THEN 2 ELSE 1 END, 'bench', CASE WHEN g % 10 = 0 THEN 'other' ELSE 'chain10' END,
                 '1', CASE WHEN g % 50 = 0 THEN 'error' ELSE 'complete' END, '\\x80'::bytea, 'order-' || g,
                 $2, CASE WHEN g % 50 = 0 THEN 1 ELSE 0 END, ts, ts + interval '30 s', ts + interval '30 s'
            FROM generate_series(1, $1) g,
                 LATERAL (SELECT now() - interval '14 days' + (g::float8 / $1) * (interval '14 days' - interval '1 minute')) x(ts)
        SQL
        c.exec(<<~SQL, [STEPS_PER_TASK, output, error])
          INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, state, pending_parents, attempts,
                                             failures, timeout_ms, output, last_error, created_at, updated_at,
                                             next_attempt_at, last_attempt_at, last_failure_at, finished_at)
          SELECT t.id, 'step_' || i, 'Bench::Noop', '\\x80'::bytea,
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN 'error' ELSE 'complete' END, 0,
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN 3 ELSE 1 END,
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN 3 ELSE 0 END, 30000,
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN NULL ELSE $2::bytea END,
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN $3::bytea END,
                 t.created_at, t.finished_at, t.created_at, t.created_at + i * interval '3 s',
                 CASE WHEN t.state = 'error' AND i = $1 - 1 THEN t.finished_at END,
                 t.created_at + i * interval '3 s' + (random() * 0.05 + 0.001) * interval '1 s'
            FROM tasker_tasks t, generate_series(0, $1 - 1) i
           ORDER BY t.id, i
        SQL
        c.exec(<<~SQL)
          INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id)
          SELECT s.id - 1, s.id FROM tasker_workflow_steps s WHERE s.name <> 'step_0'
        SQL
        c.exec(<<~SQL)
          INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, owner, reason, created_at)
          SELECT s.id, s.task_id, x.f, x.t, s.attempts, x.o, x.r, x.at
            FROM tasker_workflow_steps s,
                 LATERAL (VALUES ('pending', 'enqueued', 'orch-1', 'claim', s.last_attempt_at),
                                 ('enqueued', 'in_progress', NULL, 'dispatched', s.last_attempt_at),
                                 ('in_progress', s.state, NULL, CASE WHEN s.state = 'error' THEN 'failed' ELSE 'result' END,
                                  s.finished_at)) x(f, t, o, r, at)
           ORDER BY x.at
        SQL
        # 1,000 unfinished tasks: their first step ready, the rest waiting on it
        c.exec(<<~SQL, [STEPS_PER_TASK])
          WITH t AS (
            INSERT INTO tasker_tasks (template_id, namespace, name, version, state, context, step_count, remaining_steps)
            SELECT 1, 'bench', 'chain10', '1', 'pending', '\\x80'::bytea, $1, $1 FROM generate_series(1, 1000)
            RETURNING id
          )
          INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, pending_parents, timeout_ms)
          SELECT t.id, 'step_' || i, 'Bench::Noop', '\\x80'::bytea, least(i, 1), 30000 FROM t, generate_series(0, $1 - 1) i
        SQL
        c.exec(<<~SQL)
          INSERT INTO tasker_workers (id, owner, host, pid, capacity, in_flight, last_heartbeat_at, connected, connects)
          SELECT 'worker-' || g, 'orch-1', 'host-' || (g % 4), 1000 + g, 16, 4, now(), true, 1 FROM generate_series(1, 20) g
        SQL
        c.exec("VACUUM ANALYZE")
      end
    end
  end
end

Bench::Web.new.run if $PROGRAM_NAME == __FILE__
