# frozen_string_literal: true

# End to end: N no-op steps created, executed and recorded as complete,
# with PostgreSQL durability (synchronous_commit on, fsync on; a private
# embedded cluster in a temp dir), every contender in the same run:
#   ours       native orchestration loop in one process + 2 exe/tasker-worker
#              processes; tasks of 10 independent steps
#   sidekiq    1 process x 10 threads, and 2 processes x 10 threads, no-op
#              jobs, private redis-server (--save "" --appendonly no), logging at warn
#   GoodJob    ActiveJob on PostgreSQL (bench/goodjob: Rails 7.0, good_job 3.x,
#              its own bundle), 2 `good_job start` processes x 10 threads, in
#              the same cluster
#   Solid Queue  ActiveJob on PostgreSQL (bench/solidqueue: Rails 7.1,
#              solid_queue 1.1, its own bundle), bin/jobs: 2 worker processes
#              x 10 threads and a dispatcher, in the same cluster
#   SQL floor  2 client processes: claim 100 with SKIP LOCKED, complete with
#              = ANY(ids); the same state changes with no messaging at all
# The repeats interleave the contenders, each timed alone (Bench::E2E#alone:
# the cluster checkpointed, no autovacuum running, the idle processes of
# Sidekiq and the Rails peers stopped with SIGSTOP). After them: ours once more at half
# its median rate (a paced, steady load) for the latency at that rate; and
# each repeat creates 500 tasks through the Ruby API in a database no
# orchestrator reads (bulk creation). bench/lib/e2e.rb describes the timed
# window and the CPU accounting. Writes bench/results/e2e.json (with
# E2E_PROFILE=1: e2e_profile.json, `rake bench:e2e_profile`).
#
#   bundle exec rake bench:e2e
#   E2E_STEPS=20000 BENCH_REPEATS=3 bundle exec ruby bench/e2e_bench.rb
#   E2E_CONTENDERS=ours,sql  (a subset; default all)

require_relative "lib/e2e"

STEPS = Integer(ENV.fetch("E2E_STEPS", "20000"))
# GoodJob and Solid Queue run fewer jobs per repeat: at the 40-200 jobs/s
# they reach on this machine, 20,000 would take 2-8 minutes each.
ACTIVEJOB_STEPS = [Integer(ENV.fetch("E2E_ACTIVEJOB_STEPS", "2000")), STEPS].min
REPEATS = Integer(ENV.fetch("BENCH_REPEATS", "3"))
CONTENDERS = {
  "ours" => "ours (loop + 2 workers)",
  "sidekiq1" => "Sidekiq 1x10",
  "sidekiq2" => "Sidekiq 2x10",
  "goodjob" => "GoodJob #{Bench::E2E::PEER_PROCESSES}x#{Bench::E2E::PEER_THREADS}",
  "solidqueue" => "Solid Queue #{Bench::E2E::PEER_PROCESSES}x#{Bench::E2E::PEER_THREADS}",
  "taskeraj" => "ours via ActiveJob (loop + #{Bench::E2E::PEER_PROCESSES}x#{Bench::E2E::PEER_THREADS})",
  "sql" => "SQL floor (2 clients)"
}.freeze
WANTED = ENV.fetch("E2E_CONTENDERS", CONTENDERS.keys.join(",")).split(",")
OURS = CONTENDERS["ours"]
SPLIT = { "database" => "PostgreSQL / Redis", "workers" => "workers", "orchestrator" => "orchestrator",
          "creator" => "creating the work" }.freeze

e2e = Bench::E2E.new
samples = Hash.new { |h, k| h[k] = [] }
errors = {}
extras = Hash.new { |h, k| h[k] = [] }
want = ->(key) { WANTED.include?(key) }
loadavg = -> { File.read("/proc/loadavg").split[0, 3].join(" ") }
load_seen = [loadavg.call]
record = lambda do |who, r, i|
  %i[steps_per_s cpu_us_per_step latency_p50_ms latency_p99_ms].each { |k| samples[[who, k]] << r[k] }
  (r[:cpu_us_per_step_by_process] || {}).each { |k, v| samples[[who, "cpu:#{k}"]] << v }
  extras[who] << r.except(:steps_per_s, :cpu_us_per_step, :latency_p50_ms, :latency_p99_ms)
  printf("run %d %-28s %9.0f steps/s %8.1f CPU us/step p50 %8.1f ms p99 %8.1f ms %s\n", i + 1, who,
         r[:steps_per_s], r[:cpu_us_per_step], r[:latency_p50_ms] || -1, r[:latency_p99_ms] || -1,
         (r[:cpu_us_per_step_by_process] || {}).to_json)
end
# A contender that fails to start or run is reported as failed; the others go on.
guarded = lambda do |who, &blk|
  return nil if errors[who]

  blk.call
rescue StandardError => e
  errors[who] = e.message
  warn "#{who}: #{e.message}"
  nil
end
bulk = []
half = nil

begin
  e2e.start_postgres
  if want.("sidekiq1") || want.("sidekiq2")
    e2e.start_redis
    guarded.(CONTENDERS["sidekiq1"]) { e2e.start_sidekiq }
    errors[CONTENDERS["sidekiq2"]] = errors[CONTENDERS["sidekiq1"]] if errors[CONTENDERS["sidekiq1"]]
  end
  Bench::E2E::ACTIVEJOB_PEERS.each_key do |k|
    guarded.(CONTENDERS[k]) { e2e.start_activejob_peer(k) } if want.(k)
  end
  guarded.(OURS) { e2e.start_ours } if want.("ours")

  REPEATS.times do |i|
    runs = {}
    runs[CONTENDERS["sql"]] = guarded.(CONTENDERS["sql"]) { e2e.alone("sql") { e2e.run_sql_floor(STEPS) } } if want.("sql")
    runs[CONTENDERS["sidekiq1"]] = guarded.(CONTENDERS["sidekiq1"]) { e2e.alone("sidekiq1") { e2e.run_sidekiq(STEPS, "1x10") } } if want.("sidekiq1")
    runs[CONTENDERS["sidekiq2"]] = guarded.(CONTENDERS["sidekiq2"]) { e2e.alone("sidekiq2") { e2e.run_sidekiq(STEPS, "2x10") } } if want.("sidekiq2")
    Bench::E2E::ACTIVEJOB_PEERS.each_key do |k|
      runs[CONTENDERS[k]] = guarded.(CONTENDERS[k]) { e2e.alone(k) { e2e.run_activejob_peer(k, ACTIVEJOB_STEPS) } } if want.(k)
    end
    if want.("ours")
      runs[OURS] = guarded.(OURS) do
        e2e.reset_tasker_tables
        e2e.alone("ours") { e2e.run_ours(STEPS) }
      end
      b = guarded.("bulk creation") { e2e.run_bulk_create }
      if b
        bulk << b
        printf("run %d bulk creation: %s, %.0f steps/s, %.2f ms of database CPU per task\n", i + 1, b[:api],
               b[:steps_per_s], b[:db_cpu_ms_per_task])
      end
    end
    runs.compact.each { |who, r| record.(who, r, i) }
    load_seen << loadavg.call
  end
  peak = samples[[OURS, :steps_per_s]].compact
  unless peak.empty? || errors[OURS]
    rate = Bench.quantile(peak.sort, 0.5) / 2
    half = guarded.(OURS) do
      e2e.reset_tasker_tables
      e2e.alone("ours") { e2e.run_ours(STEPS, rate: rate) }
    end
    if half
      printf("ours at half its median rate (%.0f steps/s offered): %.0f steps/s, p50 %.1f ms, p99 %.1f ms\n", rate,
             half[:steps_per_s], half[:latency_p50_ms], half[:latency_p99_ms])
    end
  end
ensure
  e2e.stop_ours
  e2e.stop_activejob_peers
  e2e.stop_sidekiq
  e2e.stop_children
  e2e.stop_redis
  e2e.stop_postgres
end
load_seen << loadavg.call

label = "#{STEPS} no-op steps"
contenders = CONTENDERS.select { |k, _| want.(k) }.values
rows = []
add = lambda do |key, metric, unit, who_list = contenders|
  who_list.each do |who|
    s = samples[[who, key]]
    next if s.compact.empty? && !errors[who] && key != :steps_per_s

    extra = {}
    extra[:error] = errors[who] if errors[who]
    extra[:runs] = extras[who] if key == :steps_per_s && extras[who].any?
    rows << Bench.row(label: label, contender: who, metric: metric, unit: unit, samples: s.map { |v| v&.round(3) },
                      **extra)
  end
end
add.(:steps_per_s, "steps/s", "steps/s")
add.(:cpu_us_per_step, "CPU per step, all processes", "µs")
SPLIT.each { |k, name| add.("cpu:#{k}", "CPU per step, #{name}", "µs") }
add.(:latency_p50_ms, "p50 claim to complete, whole backlog at once", "ms")
add.(:latency_p99_ms, "p99 claim to complete, whole backlog at once", "ms")
if half
  [[:latency_p50_ms, "p50"], [:latency_p99_ms, "p99"]].each do |k, q|
    rows << Bench.row(label: label, contender: OURS, metric: "#{q} claim to complete at half the peak rate",
                      unit: "ms", samples: [half[k]&.round(3)],
                      offered_steps_per_s: half[:offered_steps_per_s].round, steps_per_s: half[:steps_per_s].round)
  end
end
unless bulk.empty?
  blabel = "#{Bench::E2E::BULK_TASKS} tasks x 10 steps through the Ruby API"
  rows << Bench.row(label: blabel, contender: OURS, metric: "steps created/s", unit: "steps/s",
                    samples: bulk.map { |b| b[:steps_per_s].round(1) }, api: bulk.first[:api])
  rows << Bench.row(label: blabel, contender: OURS, metric: "database CPU per task", unit: "ms",
                    samples: bulk.map { |b| b[:db_cpu_ms_per_task].round(4) }, api: bulk.first[:api])
end
rows.each { |r| Bench.print_row(r) }

targets = []
%w[sidekiq1 sidekiq2].each do |k|
  next unless want.(k)

  targets << { "label" => label, "ours" => OURS, "peer" => CONTENDERS[k], "metric" => "steps/s", "min_ratio" => 1.5 }
end
targets << { "label" => label, "ours" => OURS, "peer" => CONTENDERS["sql"], "metric" => "steps/s", "min_ratio" => 0.3 } if want.("sql")
%w[goodjob solidqueue].each do |k|
  next unless want.(k)

  targets << { "label" => label, "ours" => OURS, "peer" => CONTENDERS[k], "metric" => "steps/s", "min_ratio" => 10.0 }
end
if want.("taskeraj") && want.("goodjob")
  targets << { "label" => label, "ours" => CONTENDERS["taskeraj"], "peer" => CONTENDERS["goodjob"], "metric" => "steps/s",
               "min_ratio" => 5.0 }
end
limits = [
  { "label" => label, "contender" => OURS, "metric" => "CPU per step, all processes", "max" => 60 },
  { "label" => label, "contender" => OURS, "metric" => "CPU per step, PostgreSQL / Redis", "max" => 35 },
  { "label" => label, "contender" => OURS, "metric" => "CPU per step, workers", "max" => 18 },
  { "label" => label, "contender" => OURS, "metric" => "CPU per step, orchestrator", "max" => 5 },
  { "label" => label, "contender" => OURS, "metric" => "p50 claim to complete at half the peak rate", "max" => 3 },
  { "label" => label, "contender" => OURS, "metric" => "p99 claim to complete at half the peak rate", "max" => 20 },
  { "label" => "#{Bench::E2E::BULK_TASKS} tasks x 10 steps through the Ruby API", "contender" => OURS,
    "metric" => "steps created/s", "min" => 20_000 },
  { "label" => "#{Bench::E2E::BULK_TASKS} tasks x 10 steps through the Ruby API", "contender" => OURS,
    "metric" => "database CPU per task", "max" => 0.3 }
]
notes = [
  "Latency: ours = step transition 'claimed' (the claim) to 'complete' (results applied); GoodJob = performed_at " \
  "(a process took the job) to finished_at; Solid Queue: none (it deletes the claim when the job finishes and " \
  "keeps no claim time); SQL floor = claimed_at to completed_at; Sidekiq = enqueued_at to the " \
  "job's start (its only timestamps: with the whole backlog pushed at once, this is mostly time waiting in the " \
  "queue, so it is not comparable with the others).",
  "ours via ActiveJob: the same no-op ActiveJob job as GoodJob's, through the queue adapter :tasker_core " \
  "(enqueue_all, 1,000 per statement), one task of one step per job, run by `tasker worker` processes of a Rails " \
  "7.0 app and one `tasker orchestrator`, in a database of its own in the same cluster.",
  "GoodJob, Solid Queue and ours via ActiveJob ran #{ACTIVEJOB_STEPS} jobs per repeat (E2E_ACTIVEJOB_STEPS), the others #{STEPS}: " \
  "at their rates a full-size run would take minutes per repeat; their rates are steady well before that.",
  "Half the peak rate: ours once more after the repeats, the tasks created 10 at a time on a schedule of half " \
  "its median steps/s (a steady offered load, not a backlog); the other contenders are not run paced.",
  "CPU per step by process: 'PostgreSQL / Redis' is the cluster (or redis-server) and its children; 'workers' " \
  "ours' 2 worker processes, the Sidekiq or good_job processes, the floor's clients; 'creating the work' the " \
  "process that creates it (the driver, or the ActiveJob peers' enqueuer).",
  "Bulk creation: #{bulk.first&.fetch(:api) || 'not measured'}, in a database of the same cluster that no " \
  "orchestrator reads; database CPU = the whole cluster's CPU over the call, per task.",
  "Load average (1, 5, 15 min) read at the start, after each repeat and at the end: #{load_seen.join(' | ')}."
]
errors.each { |who, msg| notes << "#{who} failed: #{msg}" }
if Bench::E2E::PROFILE
  # A profile run is not the comparison: sampling and statement tracking
  # cost the contenders on PostgreSQL CPU that Sidekiq does not pay.
  notes = ["Profiled (E2E_PROFILE=1): perf sampling and pg_stat_statements (track = all) run during ours' runs " \
           "and cost it CPU; the comparison is the e2e section's run, made without them.", notes[0], notes[3], notes.last]
  targets = []
  limits = []
end
Bench.write_result(Bench::E2E::PROFILE ? "e2e_profile" : "e2e",
                   parameters: { "steps" => STEPS, "activejob_peer_steps" => ACTIVEJOB_STEPS, "repeats" => REPEATS, "steps_per_task" => Bench::E2E::STEPS_PER_TASK,
                                 "task_shape" => "10 independent no-op steps", "workers" => Bench::E2E::WORKERS,
                                 "worker_concurrency" => Bench::E2E::WORKER_CONCURRENCY,
                                 "worker_prefetch" => Bench::E2E::WORKER_PREFETCH,
                                 "sidekiq" => "1x#{Bench::E2E::SIDEKIQ_THREADS} and 2x#{Bench::E2E::SIDEKIQ_THREADS}, logging at warn",
                                 "goodjob" => "good_job #{Bench.gem_in_bundle('goodjob', 'good_job')} on Rails " \
                                              "#{Bench.gem_in_bundle('goodjob', 'railties')}, " \
                                              "#{Bench::E2E::PEER_PROCESSES} processes x #{Bench::E2E::PEER_THREADS} " \
                                              "threads, LISTEN/NOTIFY, preserve_job_records",
                                 "solid_queue" => "solid_queue #{Bench.gem_in_bundle('solidqueue', 'solid_queue')} on " \
                                                  "Rails #{Bench.gem_in_bundle('solidqueue', 'railties')}, " \
                                                  "#{Bench::E2E::PEER_PROCESSES} worker processes x " \
                                                  "#{Bench::E2E::PEER_THREADS} threads polling every 0.1 s, 1 dispatcher",
                                 "create_chunk_tasks" => Bench::E2E::CREATE_CHUNK,
                                 "postgresql_settings" => e2e.pg_settings },
                   rows: rows, targets: targets, limits: limits, notes: notes)
