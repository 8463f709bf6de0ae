# frozen_string_literal: true

# The soak run (`rake soak`, not in CI): two orchestrator processes on one
# database and four worker processes run a steady stream of tasks for
# SOAK_SECONDS (default 600) while a chaos thread keeps doing what stops
# systems like this one: kill -9 of workers and orchestrators, orchestrator
# and worker pauses longer than every timeout, bursts of raw TCP and ZMTP
# connections on both endpoints, oversized and deeply nested payloads, a
# worker that crashes every time it runs a step, and a subscriber to "" that
# never reads. Then it stops the chaos and checks, in the database, that
# every task reached the state its template predicts, that no output was
# applied twice, that a task created afterwards still completes, and that
# each orchestrator stops on TERM within 15 s. Exit status 0 only if all of
# that holds. A report goes to tmp/soak/report.json.
#
# It starts its own PostgreSQL cluster in tmp/soak/pg and never touches any
# other database.
$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "fileutils"
require "json"
require "socket"
require "yaml"
require "tasker_core"
require_relative "handlers"

ROOT = File.expand_path("../..", __dir__)
WORK = File.join(ROOT, "tmp", "soak")
SECONDS = Integer(ENV.fetch("SOAK_SECONDS", "600"))
SEED = Integer(ENV.fetch("SOAK_SEED", Random.new_seed.to_s[0, 9]))
RNG = Random.new(SEED)
TERM_LIMIT_S = 15

def log(msg) = $stdout.puts("[soak #{Time.now.strftime('%H:%M:%S')}] #{msg}").tap { $stdout.flush }
def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

FileUtils.rm_rf(WORK)
FileUtils.mkdir_p(WORK)
File.chmod(0o755, WORK)
DB_URL = TaskerCore::EmbeddedPostgres.start(dir: File.join(WORK, "pg"), database: "tasker_soak")
ENV["DATABASE_URL"] = DB_URL
at_exit { TaskerCore::EmbeddedPostgres.stop(dir: File.join(WORK, "pg")) unless ENV["SOAK_KEEP_PG"] }

ENDPOINTS = Array.new(2) do
  { batch: "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}", result: "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}" }
end
CONFIG = File.join(WORK, "tasker-config.yml")
File.write(CONFIG, {
  "default" => {
    "zeromq" => { "heartbeat_interval_ms" => 200, "heartbeat_timeout_ms" => 1500,
                  "max_message_bytes" => 4 * 1024 * 1024, "max_result_bytes" => 2 * 1024 * 1024 },
    "orchestration" => { "dispatch_timeout_ms" => 2000, "max_lost_attempts" => 5 },
    "worker" => { "max_workers" => 8, "shutdown_timeout_ms" => 2000 },
    "tasks" => { "template_dir" => File.join(__dir__, "templates") },
    "logging" => { "level" => "warn" }
  }
}.to_yaml)
ENV["TASKER_CONFIG_PATH"] = CONFIG
ENV["TASKER_ENV"] = "soak"
TaskerCore.reset_config! if TaskerCore.respond_to?(:reset_config!)
TaskerCore::Store.migrate!(DB_URL)

TASKER = File.join(ROOT, "exe", "tasker")
WORKER = File.join(ROOT, "exe", "tasker-worker")
LOGS = File.join(WORK, "logs")
FileUtils.mkdir_p(LOGS)

def spawn_logged(name, env, *cmd)
  Process.spawn(env, RbConfig.ruby, "-I", File.join(ROOT, "lib"), *cmd, pgroup: true,
                                                                         out: [File.join(LOGS, "#{name}.log"), "a"],
                                                                         err: [File.join(LOGS, "#{name}.log"), "a"])
end

def spawn_orchestrator(i)
  ep = ENDPOINTS[i]
  spawn_logged("orchestrator#{i}", { "TASKER_BATCH_ENDPOINT" => ep[:batch], "TASKER_RESULT_ENDPOINT" => ep[:result] },
               TASKER, "orchestrator", "--stats-interval", "0")
end

def spawn_worker(i)
  ep = ENDPOINTS[i % 2]
  spawn_logged("worker#{i}", {}, WORKER, "--handlers", File.join(__dir__, "handlers.rb"),
               "--batch-endpoint", ep[:batch], "--result-endpoint", ep[:result])
end

ORCHESTRATORS = Array.new(2) { |i| spawn_orchestrator(i) }
WORKERS = Array.new(4) { |i| spawn_worker(i) }
# Whatever happens to this script, its processes go with it.
at_exit do
  (ORCHESTRATORS + WORKERS).each do |pid|
    Process.kill("KILL", -pid)
  rescue Errno::ESRCH, Errno::EPERM
    nil
  end
end
STATS = Hash.new(0)
EXPECTED = {} # task id => [state, error class or nil]
LOCK = Mutex.new

def expect_task(id, state, error = nil) = LOCK.synchronize { EXPECTED[id] = [state, error] }

def nested(depth) = depth.zero? ? 1 : { "d" => nested(depth - 1) }

# One task of a random kind, or a payload create_task must refuse.
def create_one(n)
  case RNG.rand(100)
  when 0...70 then expect_task(TaskerCore.create_task(name: "soak_dag", context: { "n" => n }), "complete")
  when 70...78 then expect_task(TaskerCore.create_task(name: "soak_big_context", context: { "n" => n, "pad" => "p" * 1_000_000 }), "complete")
  when 78...84 then expect_task(TaskerCore.create_task(name: "soak_fanout", context: { "n" => n }), "complete")
  when 84...88 then expect_task(TaskerCore.create_task(name: "soak_too_big_output", context: { "n" => n }), "error", "TaskerCore::PayloadTooLargeError")
  when 88...94 then expect_task(TaskerCore.create_task(name: "soak_dag", context: { "n" => n, "deep" => nested(18) }), "complete")
  when 94...97
    begin
      TaskerCore.create_task(name: "soak_dag", context: { "n" => n, "deep" => nested(40) })
      STATS[:deep_context_accepted] += 1
    rescue TaskerCore::PayloadTooDeepError
      STATS[:deep_context_refused] += 1
    end
  else
    begin
      TaskerCore.create_task(name: "soak_big_context", context: { "n" => n, "pad" => "p" * 5_000_000 })
      STATS[:big_context_accepted] += 1
    rescue TaskerCore::PayloadTooLargeError
      STATS[:big_context_refused] += 1
    end
  end
rescue TaskerCore::StoreError => e
  STATS[:create_errors] += 1
  log "create_task: #{e.class}: #{e.message[0, 120]}"
end

def pause(pid, seconds)
  Process.kill("STOP", pid)
  sleep seconds
ensure
  begin
    Process.kill("CONT", pid)
  rescue Errno::ESRCH
    nil
  end
end

def kill9(pid)
  Process.kill("KILL", -pid)
rescue Errno::ESRCH
  nil
end

def tcp_churn(endpoint, count)
  host, port = endpoint.delete_prefix("tcp://").split(":")
  count.times do
    TCPSocket.new(host, Integer(port)).close
  rescue SystemCallError
    STATS[:churn_connect_errors] += 1
  end
end

def zmtp_churn(endpoint, count)
  count.times do
    s = TaskerCore::Socket::Subscriber.new(connect: endpoint, topics: ["batch.soak-ghost."])
    sleep 0.002
    s.close
  end
end

CHAOS = {
  kill_worker: lambda {
    i = RNG.rand(WORKERS.size)
    kill9(WORKERS[i])
  },
  pause_worker: -> { pause(WORKERS[RNG.rand(WORKERS.size)], 1 + RNG.rand(4.0)) },
  pause_orchestrator: -> { pause(ORCHESTRATORS[RNG.rand(2)], 2 + RNG.rand(10.0)) },
  kill_orchestrator: lambda {
    i = RNG.rand(2)
    kill9(ORCHESTRATORS[i])
    Process.wait(ORCHESTRATORS[i])
    sleep RNG.rand(2.0)
    ORCHESTRATORS[i] = spawn_orchestrator(i)
  },
  tcp_churn: -> { tcp_churn(ENDPOINTS[RNG.rand(2)].values.sample(random: RNG), 2000) },
  zmtp_churn: -> { zmtp_churn(ENDPOINTS[RNG.rand(2)][:batch], 300) }
}.freeze

# Respawns workers that died (killed by chaos or by SoakHandlers::Crash).
def reap_workers
  WORKERS.each_with_index do |pid, i|
    next unless Process.wait(pid, Process::WNOHANG)

    STATS[:workers_respawned] += 1
    WORKERS[i] = spawn_worker(i)
  rescue Errno::ECHILD
    WORKERS[i] = spawn_worker(i)
  end
end

# A subscriber to everything that never reads, on each batch endpoint.
DEAF = ENDPOINTS.map { |ep| TaskerCore::Socket::Subscriber.new(connect: ep[:batch], topics: [""], recv_hwm: 1) }

log "seed #{SEED}; #{SECONDS} s; database #{DB_URL}; logs in #{LOGS}"
deadline = now + SECONDS
running = true
chaos = Thread.new do
  while running
    sleep 1 + RNG.rand(3.0)
    break unless running

    name, action = CHAOS.to_a.sample(random: RNG)
    STATS[:"chaos_#{name}"] += 1
    begin
      action.call
    rescue StandardError => e
      log "chaos #{name}: #{e.class}: #{e.message}"
    end
  end
end

n = 0
next_report = now + 30
next_crash = now + 10
while now < deadline
  3.times { create_one(n += 1) }
  # A step that kills every worker that runs it, now and then: it must end in
  # StepLostError after max_lost_attempts. Every step in flight on a worker
  # that dies loses an attempt with it, so a steady stream of these would
  # also use up the lost-attempt budget of steps that share its workers.
  if now >= next_crash
    expect_task(TaskerCore.create_task(name: "soak_crash", context: { "n" => n }), "error", "TaskerCore::StepLostError")
    next_crash = now + 20
  end
  reap_workers
  sleep 0.1
  if now >= next_report
    states = TaskerCore::Store.with_connection { |c| c.exec("SELECT state, count(*) AS n FROM tasker_tasks GROUP BY state").to_a } rescue []
    log "tasks: #{states.map { |r| "#{r['state']} #{r['n']}" }.join(', ')}; chaos: #{STATS.select { |k, _| k.to_s.start_with?('chaos') }}"
    next_report = now + 30
  end
end
running = false
chaos.join
ORCHESTRATORS.each { |pid| Process.kill("CONT", pid) rescue nil } # rubocop:disable Style/RescueModifier
WORKERS.each { |pid| Process.kill("CONT", pid) rescue nil } # rubocop:disable Style/RescueModifier
log "chaos stopped after #{n} creations; waiting for every task to finish"

failures = []
ids = EXPECTED.keys
finish_deadline = now + 300
loop do
  reap_workers
  open = TaskerCore::Store.with_connection do |c|
    c.exec("SELECT count(*) AS n FROM tasker_tasks WHERE id = ANY($1::bigint[]) AND state NOT IN ('complete', 'error', 'cancelled')",
           ["{#{ids.join(',')}}"]).first["n"].to_i
  end
  break if open.zero?

  if now > finish_deadline
    failures << "#{open} tasks still unfinished 300 s after the chaos stopped"
    break
  end
  sleep 1
end

ids.each do |id|
  t = TaskerCore.task(id)
  state, error_class = EXPECTED.fetch(id)
  got_error = t[:steps].filter_map { |s| s[:error] && s[:state] == "error" && s[:error]["class"] }.first
  next if t[:status] == state && (error_class.nil? || got_error == error_class)

  STATS[:"unexpected_#{t[:status]}"] += 1
  failures << "task #{id} (#{t[:name]}): #{t[:status]} #{got_error}, expected #{state} #{error_class}" if failures.size < 20
end
TaskerCore::Store.with_connection do |c|
  twice = c.exec(<<~SQL).first["n"].to_i
    SELECT count(*) AS n FROM (SELECT step_id FROM tasker_workflow_step_transitions WHERE to_state = 'complete'
                                GROUP BY step_id HAVING count(*) > 1) x
  SQL
  failures << "#{twice} steps applied more than once" unless twice.zero?
  STATS[:tasks] = ids.size
  STATS[:steps] = c.exec("SELECT count(*) AS n FROM tasker_workflow_steps").first["n"].to_i
end
failures << "a context nested 40 deep was accepted #{STATS[:deep_context_accepted]} times" if STATS[:deep_context_accepted].positive?
failures << "a 5 MB context was accepted #{STATS[:big_context_accepted]} times" if STATS[:big_context_accepted].positive?

# Liveness after everything: a new task completes, then TERM stops each orchestrator.
after = TaskerCore.create_task(name: "soak_dag", context: { "n" => "after" })
done = TaskerCore.wait_for(after, timeout: 60) rescue nil # rubocop:disable Style/RescueModifier
failures << "a task created after the chaos did not complete" unless done && done[:status] == "complete"
ORCHESTRATORS.each_with_index do |pid, i|
  Process.kill("TERM", pid)
  t0 = now
  sleep 0.05 until Process.wait(pid, Process::WNOHANG) || now - t0 > TERM_LIMIT_S
  if now - t0 > TERM_LIMIT_S
    failures << "orchestrator #{i} did not stop within #{TERM_LIMIT_S} s of TERM"
    kill9(pid)
  end
end
WORKERS.each { |pid| kill9(pid) }
DEAF.each(&:close)

report = { seed: SEED, seconds: SECONDS, stats: STATS, failures: failures, at: Time.now.utc.iso8601 }
File.write(File.join(WORK, "report.json"), JSON.pretty_generate(report))
log JSON.pretty_generate(report)
exit(failures.empty? ? 0 : 1)
