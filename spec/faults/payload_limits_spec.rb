# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# Payloads against zeromq.max_message_bytes (issue 10, docs/protocol.md 4.1
# and 4.5): libzmq drops a connection that delivers a message over
# ZMQ_MAXMSGSIZE, so the orchestrator splits batches by bytes as well as by
# steps, and fails a step that no live worker could ever take instead of
# sending it. A real orchestrator process, real worker processes.
RSpec.describe "faults: payload limits", :db, :no_valgrind do
  let(:conn) { connect }
  let(:batch_ep) { tcp_endpoint }
  let(:result_ep) { tcp_endpoint }

  after { cleanup_durable }

  def mib = 1024 * 1024

  def quick(name, deps = [], **extra)
    step(name, deps, handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 1 }, **extra)
  end

  # An orchestrator and two workers, all with max_message_bytes `limit`.
  def start_stack(limit, workers: 2, concurrency: 5)
    orch = spawn_orchestrator_process(batch_ep, result_ep, handle: { max_message_bytes: limit })
    config = fault_config("max_message_bytes" => limit)
    workers.times { spawn_fault_worker(batch_ep, result_ep, config: config, concurrency: concurrency) }
    orch
  end

  def blob(bytes) = { "blob" => "y" * bytes }

  it "splits batches by bytes: 20 tasks with 1 MB contexts all complete under a 4 MB limit" do
    use_templates(template("one", [quick("a")]))
    ids = Array.new(20) { |i| TaskerCore.create_task(name: "one", context: blob(mib).merge("n" => i)) }
    orch = start_stack(4 * mib)
    expect_finished_exactly_once(ids, timeout: 60)
    expect_live_after_fault(orch, template_name: "one")
  end

  it "fails a step whose context is over every worker's max_message_bytes, not retryable, and runs the rest" do
    use_templates(template("one", [quick("a", retry: { "max_attempts" => 5 })]))
    big = TaskerCore.create_task(name: "one", context: blob(mib + 200_000))
    small = Array.new(5) { |i| TaskerCore.create_task(name: "one", context: { "n" => i }) }
    orch = start_stack(mib)
    expect_finished_exactly_once(small)
    expect_finished_exactly_once([big], state: "error")
    step = TaskerCore.task(big)[:steps].first
    expect(step).to include(state: "error", attempts: 1) # failed at the edge, never retried
    error = step[:error]
    expect(error).to include("class" => "TaskerCore::PayloadTooLargeError", "retryable" => false,
                             "backtrace" => [], "retry_after" => nil)
    expect(error["message"]).to match(/is \d+ bytes as a batch entry: over max_message_bytes #{mib}\b/)
    expect_live_after_fault(orch, template_name: "one")
  end

  it "fails a step whose stored context nests deeper than the workers accept, not retryable, and runs the rest" do
    use_templates(template("one", [quick("a", retry: { "max_attempts" => 5 })]))
    deep = TaskerCore.create_task(name: "one", context: { "n" => "deep" })
    # Stored before the limit existed: create_task refuses it today (PayloadTooDeepError).
    nested = 30.times.reduce({}) { |inner, _| { "k" => inner } }
    conn.exec("UPDATE tasker_tasks SET context = $1::bytea WHERE id = $2", [TaskerCore::Codec.pack(nested), deep])
    others = Array.new(5) { |i| TaskerCore.create_task(name: "one", context: { "n" => i }) }
    orch = start_stack(16 * mib)
    expect_finished_exactly_once(others)
    expect_finished_exactly_once([deep], state: "error")
    step = TaskerCore.task(deep)[:steps].first
    expect(step).to include(state: "error", attempts: 1) # failed at the edge, never sent
    expect(step[:error]).to include("class" => "TaskerCore::PayloadTooDeepError", "retryable" => false)
    expect(step[:error]["message"]).to match(/context nests 31 levels, over max_payload_depth 24/)
    expect_live_after_fault(orch, template_name: "one")
  end

  it "sends a 3 MB output to 6 dependents under a 4 MB limit, one batch each" do
    dependents = Array.new(6) { |i| step("d#{i}", ["big"], handler: "FaultHandlers::Measure") }
    use_templates(template("fan", [step("big", handler: "FaultHandlers::BigOutput",
                                                handler_config: { "bytes" => 3 * mib }), *dependents]),
                  template("one", [quick("a")]))
    ids = Array.new(2) { TaskerCore.create_task(name: "fan", context: {}) }
    orch = start_stack(4 * mib)
    expect_finished_exactly_once(ids, timeout: 60)
    outputs = ids.flat_map { |id| TaskerCore.task(id)[:steps] }.select { |s| s[:name].start_with?("d") }.map { |s| s[:output] }
    expect(outputs.size).to eq(12)
    expect(outputs.map { |o| o["deps"]["big"] }).to all(be > 3 * mib)
    expect_live_after_fault(orch, template_name: "one")
  end
end
