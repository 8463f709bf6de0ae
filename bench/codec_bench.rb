# frozen_string_literal: true

# TaskerCore::Codec against the msgpack gem on the shapes the protocol sends:
# (a) a batch of 100 step hashes (~23 KB) and (b) one partial_result hash.
# Prints the median ops/s of each side (with min/max over the repeats) and
# writes bench/results/codec.json (bench/lib/harness.rb describes the format).
#
#   bundle exec ruby bench/codec_bench.rb [repeats] [seconds_per_repeat]
#   bundle exec rake bench:codec

require_relative "lib/harness"
require "tasker_core"
require "msgpack"

REPEATS = Integer(ARGV[0] || ENV["BENCH_REPEATS"] || 7)
SECONDS = Float(ARGV[1] || 0.3)

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

ours_pack = TaskerCore::Codec.method(:pack)
ours_unpack = TaskerCore::Codec.method(:unpack)
gem_pack = MessagePack.method(:pack)
gem_unpack = MessagePack.method(:unpack)

rows = []
targets = []
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
  %w[pack unpack].each do |op|
    label = "#{op} #{name} (#{bytes.bytesize} B)"
    pair = [["ours", samples[:"ours_#{op}"]], ["msgpack gem", samples[:"gem_#{op}"]]].map do |who, s|
      Bench.row(label: label, contender: who, metric: "ops/s", unit: "ops/s", samples: s.map(&:round),
                mb_per_s: (Bench.summary(s)["median"] * bytes.bytesize / 1e6).round(1))
    end
    pair.each { |r| Bench.print_row(r) }
    rows.concat(pair)
    targets << { "label" => label, "ours" => "ours", "peer" => "msgpack gem", "metric" => "ops/s", "min_ratio" => 1.0 }
  end
end

Bench.write_result("codec",
                   parameters: { "repeats" => REPEATS, "seconds_per_repeat" => SECONDS,
                                 "statistic" => "ops/s per repeat; median, min, max, IQR over repeats",
                                 "shapes" => { "batch_100_steps" => TaskerCore::Codec.pack(BATCH).bytesize,
                                               "partial_result" => TaskerCore::Codec.pack(PARTIAL).bytesize } },
                   rows: rows, targets: targets)
