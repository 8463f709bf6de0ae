# frozen_string_literal: true

# Loaded by `sidekiq -r` in the end-to-end benchmark: a no-op job, and a
# server middleware that records each job's enqueue-to-run latency and,
# at every BENCH_JOBS-th job, writes BENCH_DONE_FILE ({jobs, last, p50_ms,
# p99_ms}; last = wall clock when that job finished) and starts over.
require "sidekiq"
require "json"

class BenchNoopJob
  include Sidekiq::Job

  def perform; end
end

class BenchRecorder
  TARGET = Integer(ENV.fetch("BENCH_JOBS"))
  DONE_FILE = ENV.fetch("BENCH_DONE_FILE")
  LOCK = Mutex.new
  LATENCIES = []

  def call(_job_instance, job, _queue)
    started = Time.now.to_f
    yield
    enqueued = job["enqueued_at"].to_f
    enqueued /= 1000.0 if enqueued > 1e11 # Sidekiq 8 stores milliseconds
    LOCK.synchronize do
      LATENCIES << (started - enqueued) * 1000.0
      write_done(Time.now.to_f) if LATENCIES.size == TARGET
    end
  end

  def write_done(last)
    sorted = LATENCIES.sort
    pick = ->(q) { sorted[((sorted.size - 1) * q).round] }
    tmp = "#{DONE_FILE}.tmp"
    File.write(tmp, JSON.generate("jobs" => sorted.size, "last" => last, "p50_ms" => pick.(0.5), "p99_ms" => pick.(0.99)))
    File.rename(tmp, DONE_FILE)
    LATENCIES.clear
  end
end

Sidekiq.configure_server do |config|
  config.redis = { url: ENV.fetch("REDIS_URL") }
  config.logger.level = Logger::WARN
  config.server_middleware { |chain| chain.add BenchRecorder }
  config.on(:startup) do
    $stdout.puts "bench-sidekiq-ready"
    $stdout.flush
  end
end
