# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# A payload or a limit costs at most itself (docs/protocol.md 4.1, 4.5, 4.7):
# a real orchestrator process, real worker processes (exe/tasker-worker) and
# a real PostgreSQL.
RSpec.describe "faults: worker limits", :db, :no_valgrind do
  let(:conn) { connect }

  after { cleanup_durable }

  def stored_error(step_id)
    conn.exec("SELECT last_error FROM tasker_workflow_steps WHERE id = $1", [step_id]).first["last_error"].to_s
  end

  def steps_of(ids, name)
    conn.exec("SELECT id, state FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) AND name = $2",
              ["{#{ids.join(',')}}", name]).to_a
  end

  # The steps time out only after 10 minutes and the wait is far shorter:
  # the big step can only end in time through the worker's own check.
  it "fails a step whose output is over max_result_bytes with PayloadTooLargeError, and completes the rest" do
    echo = { handler: "DurableHandlers::Echo", timeout_ms: 600_000 }
    use_templates(template("big", [step("a", [], **echo),
                                   step("b", ["a"], handler: "FaultHandlers::BigOutput", handler_config: { "bytes" => 60_000 },
                                                    timeout_ms: 600_000)]),
                  template("small", [step("a", [], **echo), step("b", ["a"], **echo)]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep, handle: { max_result_bytes: 20_000 })
    # The worker holds the same limit in its configuration, for an
    # orchestrator whose batches do not carry their limits.
    config = fault_config("max_result_bytes" => 20_000)
    2.times { spawn_fault_worker(batch_ep, result_ep, config: config) }
    big = Array.new(5) { |i| TaskerCore.create_task(name: "big", context: { "n" => i }) }
    small = Array.new(20) { |i| TaskerCore.create_task(name: "small", context: { "n" => i }) }

    expect_finished_exactly_once(big, state: "error", timeout: 60)
    expect_finished_exactly_once(small, timeout: 60)
    failed = steps_of(big, "b")
    expect(failed.map { |r| r["state"] }.uniq).to eq(["error"])
    failed.each do |r|
      error = stored_error(r["id"])
      expect(error).to include("TaskerCore::PayloadTooLargeError", "over the orchestrator's limit of 20000 bytes")
      expect(error).not_to include("StepTimeoutError")
    end
    expect(steps_of(big, "a").map { |r| r["state"] }.uniq).to eq(["complete"])
    expect_live_after_fault(orch, template_name: "small")
  end

  # Depends on the orchestrator side (branches core and loop): either it
  # respects the limits the worker advertises in its heartbeats, or it
  # dispatches the steps the worker refuses (batch_refusal) again at once.
  it "finishes everything when the worker takes 2 steps a batch and the orchestrator batches 10", :needs_orchestrator_limits do
    slow = { handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 20 }, timeout_ms: 600_000 }
    use_templates(template("fan", [step("a", [], **slow), step("b", [], **slow), step("c", [], **slow),
                                   step("d", ["a", "b", "c"], **slow)]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep, config: fault_config({}, "orchestration" => { "batch_size" => 10 }))
    2.times { spawn_fault_worker(batch_ep, result_ep, config: fault_config("max_batch_steps" => 2), concurrency: 8) }
    ids = Array.new(40) { |i| TaskerCore.create_task(name: "fan", context: { "n" => i }) }

    expect_finished_exactly_once(ids, timeout: 90)
    expect_live_after_fault(orch, template_name: "fan")
  end
end
