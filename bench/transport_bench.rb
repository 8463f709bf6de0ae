# frozen_string_literal: true

# Transport: the orchestration handle against raw libzmq PUB/SUB in C, same
# message sizes, TCP loopback, same high-water marks (1000), in the same run.
#
#   publish:  N batches of 100 step Hashes through OrchestrationHandle#publish_batch
#             (packing included) to a worker peer in C (bench/raw_zmq/worker_peer.c)
#             vs raw_pub -> raw_sub sending bodies of the same size;
#   receive:  M partial_result messages from the C worker peer drained with
#             OrchestrationHandle#receive_results (each one a Ruby Hash)
#             vs raw_pub -> raw_sub of the same size.
# Time runs from the sender's start to the receiver's last message (both on
# CLOCK_MONOTONIC). Writes bench/results/transport.json.
#
#   bundle exec rake bench:transport            # builds bench/raw_zmq, then runs this
#   bundle exec ruby bench/transport_bench.rb [repeats] [batches] [partials]

require_relative "lib/harness"
require "tasker_core"

REPEATS = Integer(ARGV[0] || ENV["BENCH_REPEATS"] || 5)
BATCHES = Integer(ARGV[1] || 2_000)
PARTIALS = Integer(ARGV[2] || 100_000)
STEPS_PER_BATCH = 100
HWM = 1000
BUILD = File.join(__dir__, "raw_zmq", "build")
WORKER_ID = "bench-w1"

%w[raw_pub raw_sub worker_peer].each do |p|
  next if File.executable?(File.join(BUILD, p))

  abort "#{BUILD}/#{p} is missing: run `bundle exec rake bench:raw_zmq` (cc -lzmq -lmsgpackc) first"
end

def step(id)
  { "step_id" => id, "task_id" => (id - 1) / 10 + 1, "step_name" => "charge_payment",
    "handler" => "Payments::ChargeHandler", "handler_config" => {}, "attempt" => 1, "timeout_ms" => 30_000,
    "context" => { "order_id" => 991 + id, "amount" => "19.99", "currency" => "EUR" },
    "dependency_results" => { "validate" => { "ok" => true } } }
end

def batches
  Array.new(BATCHES) do |b|
    { "batch_id" => "b-#{b}", "steps" => Array.new(STEPS_PER_BATCH) { |i| step(b * STEPS_PER_BATCH + i + 1) } }
  end
end

def ns_to_s(ns) = ns.to_i / 1e9

def read_fields(io, key)
  loop do
    line = io.gets or raise "peer ended before printing #{key}"
    parts = line.split
    next unless parts.first == key

    pairs = parts.size.even? ? parts : parts[1..]
    return pairs.each_slice(2).to_h.merge("value" => parts[1])
  end
end

# One run of ours: returns { publish: {s:, bytes:}, receive: {s:, bytes:} }.
def run_ours
  batch_port = Bench.free_port
  result_port = Bench.free_port
  handle = TaskerCore::OrchestrationHandle.new(
    batch_endpoint: "tcp://127.0.0.1:#{batch_port}", result_endpoint: "tcp://127.0.0.1:#{result_port}",
    send_hwm: HWM, recv_hwm: HWM, linger_ms: 0, heartbeat_timeout_ms: 600_000
  )
  nsteps = BATCHES * STEPS_PER_BATCH
  partials = [PARTIALS, nsteps].min
  io = IO.popen([File.join(BUILD, "worker_peer"), "tcp://127.0.0.1:#{batch_port}", "tcp://127.0.0.1:#{result_port}",
                 WORKER_ID, nsteps.to_s, BATCHES.to_s, partials.to_s], "r+")
  # A bound socket attaches new connections only when its owner calls into
  # libzmq: poll the handle until the peer is live, then read its "ready".
  Bench.wait_until(10, "the worker peer to be live") { handle.workers.any? { |w| w["id"] == WORKER_ID } }
  read_fields(io, "ready")
  data = batches
  GC.start
  start = Bench.clock
  data.each { |b| handle.publish_batch(b, timeout_ms: 30_000) }
  got = read_fields(io, "batches")
  publish = { s: ns_to_s(got["last"]) - start, bytes: got["bytes"].to_i, messages: BATCHES }

  data = nil
  GC.start
  io.puts "partials"
  io.flush
  size = read_fields(io, "partial_bytes")["value"].to_i
  t0 = ns_to_s(read_fields(io, "start")["value"])
  n = 0
  bad = 0
  while n < partials
    results = handle.receive_results(timeout_ms: 10_000)
    raise "no results for 10 s after #{n} of #{partials}" if results.empty?

    results.each { |r| r["type"] == "partial_result" ? n += 1 : bad += 1 }
  end
  receive = { s: Bench.clock - t0, bytes: size * partials, messages: partials, size: size }
  io.close_write
  io.read
  io.close
  stats = handle.stats
  { publish: publish, receive: receive, other_events: bad, stats: stats }
ensure
  handle&.close
  if io && !io.closed?
    Process.kill("KILL", io.pid) rescue nil # rubocop:disable Style/RescueModifier
    io.close
  end
end

# One raw run: size-byte bodies, count messages. Returns {s:, bytes:}.
def run_raw(topic, size, count)
  port = Bench.free_port
  ep = "tcp://127.0.0.1:#{port}"
  sub = IO.popen([File.join(BUILD, "raw_sub"), ep, topic, count.to_s, HWM.to_s], "r")
  read_fields(sub, "ready")
  pub = IO.popen([File.join(BUILD, "raw_pub"), ep, topic, size.to_s, count.to_s, HWM.to_s], "r")
  start = ns_to_s(read_fields(pub, "start")["value"])
  got = read_fields(sub, "first")
  pub.read
  pub.close
  sub.close
  { s: ns_to_s(got["last"]) - start, bytes: got["bytes"].to_i, messages: count }
end

batch_body = TaskerCore::Codec.pack(
  batches.first.merge("protocol_version" => 1, "type" => "batch", "worker_id" => WORKER_ID, "sent_at" => Time.now.to_f)
).bytesize

samples = Hash.new { |h, k| h[k] = [] }
partial_size = nil
REPEATS.times do |i|
  ours = run_ours
  partial_size = ours[:receive][:size]
  raw_b = run_raw("batch.#{WORKER_ID}.", batch_body, BATCHES)
  raw_p = run_raw("partial_result", partial_size, ours[:receive][:messages])
  { "ours" => [ours[:publish], ours[:receive]], "raw libzmq (C)" => [raw_b, raw_p] }.each do |who, (pb, rc)|
    samples[[who, :publish, :msgs]] << pb[:messages] / pb[:s]
    samples[[who, :publish, :mb]] << pb[:bytes] / pb[:s] / 1e6
    samples[[who, :receive, :msgs]] << rc[:messages] / rc[:s]
    samples[[who, :receive, :mb]] << rc[:bytes] / rc[:s] / 1e6
  end
  printf("run %d: publish ours %.0f/s raw %.0f/s; receive ours %.0f/s raw %.0f/s\n", i + 1,
         samples[["ours", :publish, :msgs]].last, samples[["raw libzmq (C)", :publish, :msgs]].last,
         samples[["ours", :receive, :msgs]].last, samples[["raw libzmq (C)", :receive, :msgs]].last)
end

labels = {
  publish: "publish batches of #{STEPS_PER_BATCH} steps (#{batch_body} B)",
  receive: "receive partial_results (#{partial_size} B)"
}
rows = []
targets = []
%i[publish receive].each do |dir|
  { msgs: ["messages/s", "msg/s"], mb: ["MB/s", "MB/s"] }.each do |kind, (metric, unit)|
    ["ours", "raw libzmq (C)"].each do |who|
      rows << Bench.row(label: labels[dir], contender: who, metric: metric, unit: unit,
                        samples: samples[[who, dir, kind]].map { |v| v.round(1) })
    end
  end
  targets << { "label" => labels[dir], "ours" => "ours", "peer" => "raw libzmq (C)", "metric" => "messages/s",
               "min_ratio" => 0.5 }
end
rows.each { |r| Bench.print_row(r) }

Bench.write_result("transport",
                   parameters: { "repeats" => REPEATS, "batches" => BATCHES, "steps_per_batch" => STEPS_PER_BATCH,
                                 "partials" => [PARTIALS, BATCHES * STEPS_PER_BATCH].min, "hwm" => HWM,
                                 "transport" => "tcp://127.0.0.1", "batch_bytes" => batch_body,
                                 "partial_bytes" => partial_size },
                   rows: rows, targets: targets,
                   notes: ["ours publish = OrchestrationHandle#publish_batch of prepared batch Hashes (codec packing " \
                           "included) to a C worker peer; ours receive = C worker peer -> " \
                           "OrchestrationHandle#receive_results (each result unpacked to a Ruby Hash). Raw = " \
                           "bench/raw_zmq raw_pub -> raw_sub, fixed bodies of the same sizes."])
