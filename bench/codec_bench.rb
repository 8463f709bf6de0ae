# frozen_string_literal: true

# TaskerCore::Codec against the msgpack gem on the shapes the protocol sends:
# (a) a batch of 100 step hashes (~23 KB) and (b) one partial_result hash.
# Prints the median ops/s of each side and ours/gem, and writes
# bench/results/codec.json.
#
#   bundle exec ruby bench/codec_bench.rb [repeats] [seconds_per_repeat]

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "tasker_core"
require "msgpack"
require "json"
require "etc"
require "time"

REPEATS = Integer(ARGV[0] || 7)
SECONDS = Float(ARGV[1] || 0.5)

def step(i)
  { "step_id" => 123 + i, "task_id" => 45, "step_name" => "charge_payment", "handler" => "Payments::ChargeHandler",
    "attempt" => 1, "timeout_ms" => 30_000,
    "context" => { "order_id" => 991 + i, "amount" => "19.99", "currency" => "EUR" },
    "dependency_results" => { "validate" => { "ok" => true } } }
end

BATCH = { "protocol_version" => 1, "type" => "batch", "batch_id" => "b-000042", "worker_id" => "worker-1",
          "sent_at" => 1_700_000_000.25, "steps" => Array.new(100) { |i| step(i) } }.freeze

PARTIAL = { "protocol_version" => 1, "type" => "partial_result", "batch_id" => "b-000042", "worker_id" => "worker-1",
            "step_id" => 123, "task_id" => 45, "attempt" => 1, "status" => "complete",
            "output" => { "charge_id" => "ch_3N5", "amount" => "19.99", "captured" => true },
            "error" => nil, "started_at" => 1_700_000_000.25, "finished_at" => 1_700_000_000.5,
            "duration_ms" => 250.0 }.freeze

def clock
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

# Runs the block in chunks for about SECONDS and returns ops/s.
def rate
  n = 0
  chunk = 16
  start = clock
  loop do
    chunk.times { yield }
    n += chunk
    elapsed = clock - start
    return n / elapsed if elapsed >= SECONDS

    chunk *= 2 if elapsed < SECONDS / 10
  end
end

def median(values)
  s = values.sort
  s.size.odd? ? s[s.size / 2] : (s[s.size / 2 - 1] + s[s.size / 2]) / 2.0
end

ours_pack = TaskerCore::Codec.method(:pack)
ours_unpack = TaskerCore::Codec.method(:unpack)
gem_pack = MessagePack.method(:pack)
gem_unpack = MessagePack.method(:unpack)

results = {}
{ "batch_100_steps" => BATCH, "partial_result" => PARTIAL }.each do |name, obj|
  bytes = TaskerCore::Codec.pack(obj)
  raise "codec and gem disagree on #{name}" unless MessagePack.unpack(bytes) == obj && TaskerCore::Codec.unpack(MessagePack.pack(obj)) == obj

  samples = Hash.new { |h, k| h[k] = [] }
  REPEATS.times do
    # Alternate the contenders within each repeat so drift hits both alike.
    samples[:ours_pack] << rate { ours_pack.call(obj) }
    samples[:gem_pack] << rate { gem_pack.call(obj) }
    samples[:ours_unpack] << rate { ours_unpack.call(bytes) }
    samples[:gem_unpack] << rate { gem_unpack.call(bytes) }
  end
  m = samples.transform_values { |v| median(v) }
  results[name] = {
    "bytes" => bytes.bytesize,
    "pack_ops_per_s" => { "ours" => m[:ours_pack].round, "gem" => m[:gem_pack].round,
                          "ratio_ours_over_gem" => (m[:ours_pack] / m[:gem_pack]).round(3) },
    "unpack_ops_per_s" => { "ours" => m[:ours_unpack].round, "gem" => m[:gem_unpack].round,
                            "ratio_ours_over_gem" => (m[:ours_unpack] / m[:gem_unpack]).round(3) }
  }
  %w[pack unpack].each do |op|
    r = results[name]["#{op}_ops_per_s"]
    printf("%-16s %-6s ours %10.0f ops/s   gem %10.0f ops/s   ours/gem %.2f\n",
           name, op, r["ours"], r["gem"], r["ratio_ours_over_gem"])
  end
end

report = {
  "date" => Time.now.utc.iso8601,
  "ruby" => RUBY_DESCRIPTION,
  "msgpack_gem" => MessagePack::VERSION,
  "tasker_core" => TaskerCore::VERSION,
  "nproc" => Etc.nprocessors,
  "repeats" => REPEATS,
  "seconds_per_repeat" => SECONDS,
  "statistic" => "median ops/s over repeats",
  "results" => results
}
dir = File.join(__dir__, "results")
Dir.mkdir(dir) unless Dir.exist?(dir)
File.write(File.join(dir, "codec.json"), JSON.pretty_generate(report) + "\n")
puts "wrote #{File.join(dir, 'codec.json')}"
