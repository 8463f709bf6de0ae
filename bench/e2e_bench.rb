# frozen_string_literal: true

# End to end: N no-op steps created, executed and recorded as complete,
# with PostgreSQL durability (synchronous_commit on, fsync on; a private
# embedded cluster in a temp dir), three contenders in the same run:
#   ours       native orchestration loop in one process + 2 exe/tasker-worker
#              processes (10 threads each); tasks of 10 independent steps
#   sidekiq    1 process x 10 threads, no-op jobs, private redis-server
#              (--save "" --appendonly no)
#   SQL floor  2 client processes: claim 100 with SKIP LOCKED, complete with
#              = ANY(ids); the same state changes with no messaging at all
# The repeats interleave the contenders. bench/lib/e2e.rb describes the
# timed window and the CPU accounting. Writes bench/results/e2e.json.
#
#   bundle exec rake bench:e2e
#   E2E_STEPS=20000 BENCH_REPEATS=3 bundle exec ruby bench/e2e_bench.rb

require_relative "lib/e2e"

STEPS = Integer(ENV.fetch("E2E_STEPS", "20000"))
REPEATS = Integer(ENV.fetch("BENCH_REPEATS", "5"))
CONTENDERS = {
  "ours" => "ours (loop + 2 workers)",
  "sidekiq" => "sidekiq (1 process x 10 threads)",
  "sql" => "batched SQL floor (2 clients)"
}.freeze
OURS, SIDEKIQ, SQL = CONTENDERS.values

e2e = Bench::E2E.new
samples = Hash.new { |h, k| h[k] = [] }
errors = {}
extras = Hash.new { |h, k| h[k] = [] }

begin
  e2e.start_postgres
  e2e.start_redis
  begin
    e2e.start_ours
  rescue StandardError => e
    errors[OURS] = "could not start: #{e.message}"
    warn "ours: #{errors[OURS]}"
    e2e.stop_ours
  end
  e2e.start_sidekiq(STEPS)

  REPEATS.times do |i|
    runs = {}
    runs[SQL] = e2e.run_sql_floor(STEPS)
    runs[SIDEKIQ] = e2e.run_sidekiq(STEPS)
    unless errors[OURS]
      begin
        e2e.reset_tasker_tables
        runs[OURS] = e2e.run_ours(STEPS)
      rescue StandardError => e
        errors[OURS] = "run #{i + 1} failed: #{e.message}"
        warn "ours: #{errors[OURS]}"
      end
    end
    runs.each do |who, r|
      %i[steps_per_s cpu_us_per_step latency_p50_ms latency_p99_ms].each { |k| samples[[who, k]] << r[k] }
      extras[who] << r.except(:steps_per_s, :cpu_us_per_step, :latency_p50_ms, :latency_p99_ms)
      printf("run %d %-40s %9.0f steps/s %8.1f CPU us/step p50 %8.1f ms p99 %8.1f ms\n", i + 1, who,
             r[:steps_per_s], r[:cpu_us_per_step], r[:latency_p50_ms] || -1, r[:latency_p99_ms] || -1)
    end
  end
ensure
  e2e.stop_ours
  e2e.stop_sidekiq
  e2e.stop_children
  e2e.stop_redis
  e2e.stop_postgres
end

label = "#{STEPS} no-op steps"
metrics = {
  steps_per_s: ["steps/s", "steps/s"], cpu_us_per_step: ["CPU per step, all processes", "µs"],
  latency_p50_ms: ["p50 dispatch-to-result", "ms"], latency_p99_ms: ["p99 dispatch-to-result", "ms"]
}
rows = []
metrics.each do |key, (metric, unit)|
  CONTENDERS.each_value do |who|
    s = samples[[who, key]].map { |v| v&.round(3) }
    extra = {}
    extra[:error] = errors[who] if errors[who]
    extra[:runs] = extras[who] if key == :steps_per_s && extras[who].any?
    rows << Bench.row(label: label, contender: who, metric: metric, unit: unit, samples: s, **extra)
  end
end
rows.each { |r| Bench.print_row(r) }
targets = [
  { "label" => label, "ours" => OURS, "peer" => SIDEKIQ, "metric" => "steps/s", "min_ratio" => 2.0 },
  { "label" => label, "ours" => OURS, "peer" => SQL, "metric" => "steps/s", "min_ratio" => 0.5 }
]
notes = ["Latency: ours = step transition 'claimed' (the claim) to 'complete' (results applied); SQL floor = " \
         "claimed_at to completed_at; Sidekiq = enqueued_at to the job's start (its only timestamps: with the " \
         "whole backlog pushed at once, this is mostly time waiting in the queue)."]
notes << "ours failed: #{errors[OURS]}" if errors[OURS]
Bench.write_result("e2e",
                   parameters: { "steps" => STEPS, "repeats" => REPEATS, "steps_per_task" => Bench::E2E::STEPS_PER_TASK,
                                 "task_shape" => "10 independent no-op steps", "workers" => Bench::E2E::WORKERS,
                                 "worker_concurrency" => Bench::E2E::WORKER_CONCURRENCY,
                                 "sidekiq_threads" => Bench::E2E::SIDEKIQ_THREADS,
                                 "create_chunk_tasks" => Bench::E2E::CREATE_CHUNK,
                                 "postgresql_settings" => e2e.pg_settings },
                   rows: rows, targets: targets, notes: notes)
