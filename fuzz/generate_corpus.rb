# frozen_string_literal: true

# Writes the seed corpora under fuzz/corpus/: real protocol messages
# (version 2, and version 1 as older workers send them)
# built with TaskerCore::Protocol and packed with TaskerCore::Codec (every
# message type, results with outputs and errors, nested values, times),
# plus a few plain values for the codec. Run: ruby -Ilib fuzz/generate_corpus.rb
require "digest"
require "fileutils"
require "tasker_core"

P = TaskerCore::Protocol
root = File.expand_path("corpus", __dir__)
t = Time.at(1_700_000_000, 123_456, :usec)

def step(id)
  { step_id: id, task_id: id / 3 + 1, step_name: "step_#{id}", handler: "Handlers::Step#{id}",
    handler_config: { "retries" => 3, "tags" => %w[a b] }, attempt: 1 + id % 3, timeout_ms: 30_000,
    context: { "order_id" => id * 7, "nested" => { "deep" => [1, [2, [3, { "x" => nil }]]] } },
    dependency_results: { "fetch" => { "rows" => [1, 2, 3], "ok" => true } } }
end

err = P.error_object(klass: "Net::ReadTimeout", message: "timed out", backtrace: ["a.rb:1", "b.rb:2"],
                     retryable: true, retry_after: 1.5)
messages = [
  P.batch(batch_id: "b-1", worker_id: "w1", steps: [step(1)]),
  P.batch(batch_id: "b-2", worker_id: "w-2", steps: (1..5).map { |i| step(i) }),
  P.partial_result(batch_id: "b-1", worker_id: "w1", step_id: 1, task_id: 1, attempt: 1, started_at: t,
                   finished_at: t + 0.25, output: { "total" => 12.5, "items" => [1, "two", nil, true],
                                                    "at" => t, "big" => 2**63 - 1, "neg" => -2**63 }),
  P.partial_result(batch_id: "b-1", worker_id: "w1", step_id: 2, task_id: 1, attempt: 2, started_at: t,
                   finished_at: t + 1, error: err),
  P.partial_result(batch_id: "b-1", worker_id: "w1", step_id: 3, task_id: 1, attempt: 1, started_at: t,
                   finished_at: t, error: P.error_object(klass: "Boom", message: "no", retryable: false)),
  P.batch_completion(batch_id: "b-1", worker_id: "w1",
                     steps: [{ step_id: 1, attempt: 1, status: "complete" }, { step_id: 2, attempt: 2, status: "error" }]),
  P.heartbeat(worker_id: "w1", capacity: 10, in_flight: 3, pid: 4242, host: "worker-host", sent_at: t),
  P.goodbye(worker_id: "w1", reason: "shutdown"),
  # heartbeat limits and reconciliation, and batch_refusal (docs/protocol.md 4.5, 4.7), as plain maps
  P.heartbeat(worker_id: "w1", capacity: 10, in_flight: 2, pid: 4242, host: "worker-host", sent_at: t)
   .merge("limits" => { "max_batch_steps" => 100, "max_message_bytes" => 1 << 20, "max_payload_depth" => 24 },
          "last_batch_id" => "b-2", "in_flight_steps" => [[1, 1], [2, 3]]),
  { "protocol_version" => 1, "type" => "batch_refusal", "batch_id" => "b-2", "worker_id" => "w1", "reason" => "too_deep",
    "message" => "too deep", "steps" => [{ "step_id" => 4, "attempt" => 1, "reason" => "too_deep", "message" => "30 > 24" }] },
  { "protocol_version" => 1, "type" => "batch_refusal", "batch_id" => nil, "worker_id" => "w1", "reason" => "undecodable",
    "message" => "cut", "steps" => [] },
  # version 2: several results in one message, across batches (docs/protocol.md 4.3); a version 1
  # partial_result with an integer key in its output (accepted), the same in version 2 (refused)
  P.partial_results(worker_id: "w1", results: [
                      P.result_entry(batch_id: "b-1", step_id: 1, task_id: 1, attempt: 1, started_at: t, finished_at: t + 0.1,
                                     output: { "rows" => [{ "a" => 1 }], "bin" => "\x00\xff".b }),
                      P.result_entry(batch_id: "b-2", step_id: 4, task_id: 2, attempt: 3, started_at: t, finished_at: t + 1,
                                     error: err)
                    ]),
  P.partial_result(batch_id: "b-1", worker_id: "w1", step_id: 5, task_id: 1, attempt: 1, started_at: t, finished_at: t,
                   output: { 1 => "one" }, version: 1),
  P.partial_result(batch_id: "b-1", worker_id: "w1", step_id: 5, task_id: 1, attempt: 1, started_at: t, finished_at: t,
                   output: { "n" => { 2 => nil } })
]
values = [nil, true, 0, -1, 2**64 - 1, 1.5, "", "x" * 40, "\xff\x00".b, [], {}, [t], { 1 => { "a" => [[[]]] } }]

bodies = messages.map { |m| TaskerCore::Codec.pack(m) }
{ "codec" => bodies + values.map { |v| TaskerCore::Codec.pack(v) }, "protocol" => bodies }.each do |name, seeds|
  dir = File.join(root, name)
  FileUtils.mkdir_p(dir)
  seeds.each { |s| File.binwrite(File.join(dir, "seed-#{Digest::SHA1.hexdigest(s)[0, 12]}"), s) }
  puts "#{dir}: #{seeds.size} seeds"
end
