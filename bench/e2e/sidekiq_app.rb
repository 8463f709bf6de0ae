# frozen_string_literal: true

# Loaded by `sidekiq -r` in the end-to-end benchmark: a no-op job, and a
# server middleware that counts the jobs of each run (the job's one argument
# is the run's id) and records each job's enqueue-to-run latency. Several
# Sidekiq processes may share a run, so each process reports on its own: a
# reporter thread rewrites BENCH_DONE_DIR/<pid>.json every 20 ms while its
# count changes ({run, jobs, last}; last = wall clock when its latest job
# finished) and, once the count has stood still for a tick, adds the
# latencies ("lat"). bench/lib/e2e.rb adds the processes' counts up.
require "sidekiq"
require "json"

class BenchNoopJob
  include Sidekiq::Job

  def perform(_run); end
end

class BenchRecorder
  DONE_DIR = ENV.fetch("BENCH_DONE_DIR")
  LOCK = Mutex.new
  STATE = { run: nil, jobs: 0, last: nil, lat: [] }

  def call(_job_instance, job, _queue)
    started = Time.now.to_f
    yield
    finished = Time.now.to_f
    enqueued = job["enqueued_at"].to_f
    enqueued /= 1000.0 if enqueued > 1e11 # Sidekiq 8 stores milliseconds
    run = job["args"].first
    LOCK.synchronize do
      if STATE[:run] != run
        STATE[:run] = run
        STATE[:jobs] = 0
        STATE[:lat] = []
      end
      STATE[:jobs] += 1
      STATE[:last] = finished
      STATE[:lat] << (started - enqueued) * 1000.0
    end
  end

  def self.report_forever
    path = File.join(DONE_DIR, "#{Process.pid}.json")
    written = nil
    seen = nil
    loop do
      sleep 0.02
      run, jobs, last = LOCK.synchronize { STATE.values_at(:run, :jobs, :last) }
      next if run.nil?

      now = [run, jobs]
      if now == seen && written != [run, jobs, :lat]
        lat = LOCK.synchronize { STATE[:lat].dup }
        write(path, "run" => run, "jobs" => jobs, "last" => last, "lat" => lat)
        written = [run, jobs, :lat]
      elsif now != seen
        write(path, "run" => run, "jobs" => jobs, "last" => last)
        written = now
      end
      seen = now
    end
  end

  def self.write(path, doc)
    tmp = "#{path}.tmp"
    File.write(tmp, JSON.generate(doc))
    File.rename(tmp, path)
  end
end

Sidekiq.configure_server do |config|
  config.redis = { url: ENV.fetch("REDIS_URL") }
  config.logger.level = Logger::WARN
  config.server_middleware { |chain| chain.add BenchRecorder }
  config.on(:startup) do
    Thread.new { BenchRecorder.report_forever }
    $stdout.puts "bench-sidekiq-ready"
    $stdout.flush
  end
end
