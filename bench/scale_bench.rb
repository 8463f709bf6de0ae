# frozen_string_literal: true

# Scale: does throughput hold as finished history grows? With 10k, 100k and
# 1M finished steps already stored (bulk-inserted with generate_series:
# complete tasks of 10 complete steps, 3 transitions per step), runs the
# end-to-end workload (SCALE_STEPS new no-op steps) through ours and
# through the batched-SQL floor (its bench_jobs table given the same number
# of finished rows), and records steps/s and the orchestrator's RSS.
# Writes bench/results/scale.json.
#
#   bundle exec rake bench:scale
#   SCALE_STEPS=5000 SCALE_HISTORY=10000,100000 BENCH_REPEATS=3 bundle exec ruby bench/scale_bench.rb

require_relative "lib/e2e"

STEPS = Integer(ENV.fetch("SCALE_STEPS", "10000"))
REPEATS = Integer(ENV.fetch("BENCH_REPEATS", "5"))
HISTORY = ENV.fetch("SCALE_HISTORY", "10000,100000,1000000").split(",").map { |s| Integer(s) }
OURS = "ours (loop + 2 workers)"
SQL = "batched SQL floor (2 clients)"

HISTORY_SQL = <<~SQL
  WITH tpl AS (
    INSERT INTO tasker_task_templates (namespace, name, version, definition)
    VALUES ('bench', 'history', '1', '{}'::jsonb)
    ON CONFLICT (namespace, name, version) DO UPDATE SET updated_at = now() RETURNING id
  ), t AS (
    INSERT INTO tasker_tasks (template_id, namespace, name, version, state, context, step_count, remaining_steps,
                              created_at, updated_at, finished_at)
    SELECT tpl.id, 'bench', 'history', '1', 'complete', '\\x80'::bytea, 10, 0,
           now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
      FROM tpl, generate_series(1, $1)
    RETURNING id
  )
  INSERT INTO tasker_workflow_steps (task_id, name, handler, handler_config, state, pending_parents, attempts,
                                     timeout_ms, output, last_attempt_at, finished_at)
  SELECT t.id, 'step_' || i, 'BenchHandlers::Noop', '\\x80'::bytea, 'complete', 0, 1, 30000, '\\x80'::bytea,
         now() - interval '1 day', now() - interval '1 day'
    FROM t, generate_series(0, 9) AS i
SQL

STEP_TRANSITIONS_SQL = <<~SQL
  INSERT INTO tasker_workflow_step_transitions (step_id, task_id, from_state, to_state, attempt, reason, created_at)
  SELECT s.id, s.task_id, x.f, x.t, x.a, 'history', now() - interval '1 day'
    FROM tasker_workflow_steps s
    CROSS JOIN (VALUES (NULL, 'pending', 0), ('pending', 'enqueued', 1), ('enqueued', 'complete', 1)) AS x(f, t, a)
   WHERE s.id > $1
SQL

TASK_TRANSITIONS_SQL = <<~SQL
  INSERT INTO tasker_task_transitions (task_id, from_state, to_state, reason, created_at)
  SELECT t.id, x.f, x.t, 'history', now() - interval '1 day'
    FROM tasker_tasks t
    CROSS JOIN (VALUES (NULL, 'pending'), ('pending', 'in_progress'), ('in_progress', 'complete')) AS x(f, t)
   WHERE t.id > $1
SQL

# Adds finished history until `total` finished steps are stored (the runs'
# own steps count too). Returns seconds spent.
def grow_history(e2e, total)
  t0 = Bench.clock
  have = e2e.conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE state = 'complete'").first["n"].to_i
  add_tasks = [(total - have) / Bench::E2E::STEPS_PER_TASK, 0].max
  if add_tasks.positive?
    max_step = e2e.conn.exec("SELECT coalesce(max(id), 0) AS m FROM tasker_workflow_steps").first["m"].to_i
    max_task = e2e.conn.exec("SELECT coalesce(max(id), 0) AS m FROM tasker_tasks").first["m"].to_i
    e2e.conn.exec(HISTORY_SQL, [add_tasks])
    e2e.conn.exec(STEP_TRANSITIONS_SQL, [max_step])
    e2e.conn.exec(TASK_TRANSITIONS_SQL, [max_task])
  end
  Bench::E2E::FLOOR_SCHEMA.split(";").map(&:strip).reject(&:empty?).each { |s| e2e.conn.exec(s) }
  jobs = e2e.conn.exec("SELECT count(*) AS n FROM bench_jobs WHERE state = 'complete'").first["n"].to_i
  if total > jobs
    e2e.conn.exec(<<~SQL, [total - jobs])
      INSERT INTO bench_jobs (state, created_at, claimed_at, completed_at)
      SELECT 'complete', now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
        FROM generate_series(1, $1)
    SQL
  end
  e2e.conn.exec("VACUUM ANALYZE")
  Bench.clock - t0
end

e2e = Bench::E2E.new
samples = Hash.new { |h, k| h[k] = [] }
rss = {}
fill = {}
errors = {}
begin
  e2e.start_postgres
  begin
    e2e.start_ours
  rescue StandardError => e
    errors[OURS] = "could not start: #{e.message}"
    warn "ours: #{errors[OURS]}"
    e2e.stop_ours
  end
  HISTORY.each do |h|
    fill[h] = grow_history(e2e, h).round(1)
    stored = e2e.conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps").first["n"].to_i
    puts "history #{h}: #{stored} steps stored (filled in #{fill[h]} s)"
    REPEATS.times do |i|
      r = e2e.run_sql_floor(STEPS, keep_history: true)
      samples[[h, SQL]] << r[:steps_per_s]
      unless errors[OURS]
        begin
          o = e2e.run_ours(STEPS)
          samples[[h, OURS]] << o[:steps_per_s]
          rss[h] = o[:orchestrator_rss_kb]
        rescue StandardError => e
          errors[OURS] = "history #{h} run #{i + 1} failed: #{e.message}"
          warn "ours: #{errors[OURS]}"
        end
      end
      printf("history %-8d run %d  SQL floor %8.0f steps/s  ours %8s steps/s\n", h, i + 1, r[:steps_per_s],
             samples[[h, OURS]].last&.round.to_s)
    end
  end
ensure
  e2e.stop_ours
  e2e.stop_children
  e2e.stop_postgres
end

rows = []
HISTORY.each do |h|
  label = "#{STEPS} steps with #{h} finished steps stored"
  [OURS, SQL].each do |who|
    extra = {}
    extra[:error] = errors[who] if errors[who] && samples[[h, who]].empty?
    extra[:orchestrator_rss_kb] = rss[h] if who == OURS
    rows << Bench.row(label: label, contender: who, metric: "steps/s", unit: "steps/s",
                      samples: samples[[h, who]].map { |v| v.round(1) }, **extra)
  end
  rows << Bench.row(label: label, contender: OURS, metric: "orchestrator RSS", unit: "MB",
                    samples: rss[h] ? [(rss[h] / 1024.0).round(1)] : [])
end
rows.each { |r| Bench.print_row(r) }
first = rows.find { |r| r["contender"] == OURS && r["metric"] == "steps/s" }
last = rows.reverse.find { |r| r["contender"] == OURS && r["metric"] == "steps/s" }
held = first && last && first["median"] && last["median"] ? (last["median"] / first["median"]).round(3) : nil
notes = ["Throughput at the largest history over throughput at the smallest (ours): #{held || 'n/a'} " \
         "(1.0 = no fall; the run-to-run spread on this machine is shown in each cell)."]
notes << "ours failed: #{errors[OURS]}" if errors[OURS]
Bench.write_result("scale",
                   parameters: { "steps_per_run" => STEPS, "repeats" => REPEATS, "history_finished_steps" => HISTORY,
                                 "history_fill_seconds" => fill, "workers" => Bench::E2E::WORKERS,
                                 "worker_concurrency" => Bench::E2E::WORKER_CONCURRENCY,
                                 "worker_prefetch" => Bench::E2E::WORKER_PREFETCH,
                                 "ours_throughput_largest_over_smallest_history" => held },
                   rows: rows, notes: notes)
