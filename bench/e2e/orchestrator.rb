# frozen_string_literal: true

# The orchestrator process of the end-to-end benchmark: one
# OrchestrationHandle bound to the given endpoints, its native loop started
# on the given database. Protocol on stdin/stdout with bench/lib/e2e.rb:
#   prints "ready" once the loop runs, "workers N" once N workers are live;
#   a line "stats" on stdin prints the handle's stats as one JSON line;
#   end of stdin stops the loop and exits.
#
#   ruby bench/e2e/orchestrator.rb BATCH_ENDPOINT RESULT_ENDPOINT DATABASE_URL WORKERS

$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "tasker_core"
require "json"

batch_ep, result_ep, url, nworkers = ARGV
$stdout.sync = true
handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: batch_ep, result_endpoint: result_ep,
                                             send_hwm: 1000, recv_hwm: 1000, linger_ms: 0,
                                             heartbeat_timeout_ms: 10_000)
batch_size = Integer(ENV.fetch("BENCH_BATCH_SIZE", "100"))
poll_ms = Integer(ENV.fetch("BENCH_POLL_INTERVAL_MS", "50"))
if handle.respond_to?(:start_orchestration)
  handle.start_orchestration(database_url: url, batch_size: batch_size, poll_interval_ms: poll_ms)
elsif handle.respond_to?(:_start_orchestration, true)
  # The native loop is built but its Ruby wrapper (lib/tasker_core/orchestration_loop.rb,
  # branch loop) has not landed yet: call the C entry point with the same arguments.
  handle.send(:_start_orchestration, url, "bench-#{Process.pid}", batch_size, 10_000, poll_ms)
else
  warn "bench orchestrator: this build has no native orchestration loop " \
       "(OrchestrationHandle#start_orchestration is missing)"
  exit 3
end
puts "ready"
deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 60
sleep 0.05 until handle.workers.size >= Integer(nworkers) || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
puts "workers #{handle.workers.size}"

while (line = $stdin.gets)
  next unless line.strip == "stats"

  stats = handle.stats
  puts JSON.generate(stats.to_h { |k, v| [k.to_s, v] })
end
handle.stop_orchestration(timeout_ms: 10_000) if handle.orchestrating?
handle.close
