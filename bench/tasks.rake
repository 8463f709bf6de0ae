# frozen_string_literal: true

# Benchmark tasks (imported by the Rakefile). `rake bench` runs every
# benchmark at its default sizes, then rebuilds the README table.
# BENCH_REPEATS=N overrides the number of repeats of each benchmark.

RAW_ZMQ_DIR = "bench/raw_zmq"
RAW_ZMQ_BUILD = "#{RAW_ZMQ_DIR}/build"
RAW_ZMQ_PROGRAMS = { "raw_pub" => %w[-lzmq], "raw_sub" => %w[-lzmq], "worker_peer" => %w[-lzmq -lmsgpackc] }.freeze

directory RAW_ZMQ_BUILD
RAW_ZMQ_PROGRAMS.each do |name, libs|
  file "#{RAW_ZMQ_BUILD}/#{name}" => ["#{RAW_ZMQ_DIR}/#{name}.c", "#{RAW_ZMQ_DIR}/common.h", RAW_ZMQ_BUILD] do |t|
    sh "cc", "-O2", "-Wall", "-Wextra", "-o", t.name, "#{RAW_ZMQ_DIR}/#{name}.c", *libs
  end
end

def bench_ruby(script, *args)
  sh Gem.ruby, script, *args.map(&:to_s)
end

desc "Run every benchmark (codec, transport, e2e and its profile, scale) and rebuild bench/README.md's table"
task bench: %w[bench:codec bench:transport bench:e2e bench:e2e_profile bench:scale bench:report]

namespace :bench do
  desc "Build the raw libzmq programs of the transport benchmark (cc -lzmq)"
  task raw_zmq: RAW_ZMQ_PROGRAMS.keys.map { |n| "#{RAW_ZMQ_BUILD}/#{n}" }

  desc "Codec: TaskerCore::Codec vs the msgpack gem"
  task codec: :compile do
    bench_ruby "bench/codec_bench.rb"
  end

  desc "Transport: OrchestrationHandle vs raw libzmq PUB/SUB in C"
  task transport: %i[compile raw_zmq] do
    bench_ruby "bench/transport_bench.rb"
  end

  desc "End to end: ours (and ours via ActiveJob) vs Sidekiq 1x10 and 2x10, GoodJob, Solid Queue and the batched-SQL floor (E2E_STEPS=N, E2E_CONTENDERS=...)"
  task e2e: :compile do
    bench_ruby "bench/e2e_bench.rb"
  end

  desc "Where ours' CPU goes: ours alone end to end with perf and pg_stat_statements (writes e2e_profile.json)"
  task e2e_profile: :compile do
    sh({ "E2E_PROFILE" => "1", "E2E_CONTENDERS" => "ours" }, Gem.ruby, "bench/e2e_bench.rb")
  end

  desc "Scale: throughput and orchestrator memory with 10k/100k/1M finished steps stored"
  task scale: :compile do
    bench_ruby "bench/scale_bench.rb"
  end

  desc "Store only: the loop's SQL functions from one connection (STORE_STEPS=N, STORE_MODES=drain,concurrent)"
  task store: :compile do
    bench_ruby "bench/store_bench.rb"
  end

  desc "Retention: new steps/s while 1M old finished steps are deleted, vs without (RETENTION_FINISHED_STEPS, RETENTION_NEW_STEPS)"
  task retention: :compile do
    bench_ruby "bench/retention_bench.rb"
  end

  desc "Rebuild the results table in bench/README.md from bench/results/*.json"
  task :report do
    bench_ruby "bench/report.rb"
  end
end
