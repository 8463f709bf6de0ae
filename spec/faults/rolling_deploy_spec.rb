# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# A rolling deploy: workers that prefetch are stopped with TERM one after
# another and replaced while work keeps arriving. The steps a worker holds
# but has not started go back to pending (a `draining` refusal, not a lost
# attempt), the ones it started finish, and its last results count even
# when its unsubscription overtakes them (docs/protocol.md section 10).
RSpec.describe "rolling deploy", :db, :no_valgrind do
  let(:conn) { connect }

  after { cleanup_durable }

  def completed = conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE state = 'complete'").first["n"].to_i

  it "stops and replaces every worker in turn under load: each step completes once, none fails" do
    # not retryable: a step failed by the deploys would leave its task in error
    once = { "retryable" => false }
    use_templates(template("deploy_chain", Array.new(3) do |i|
      step("s#{i}", i.zero? ? [] : ["s#{i - 1}"], handler: "DurableHandlers::Slow",
                                                   handler_config: { "sleep_ms" => 40 }, retry: once)
    end))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep)
    workers = Array.new(3) { spawn_fault_worker(batch_ep, result_ep, concurrency: 2, prefetch: 10) }
    ids = Array.new(60) { |i| TaskerCore.create_task(name: "deploy_chain", context: { "n" => i }) }

    6.times do
      # work flowing before each stop, so the worker stopped holds some
      done = completed
      wait_until(timeout: 60, message: "progress before the next stop") { completed >= done + 10 }
      stopped = workers.shift
      Process.kill("TERM", stopped)
      _, status = Process.wait2(stopped)
      @spawned_pids.delete(stopped)
      expect(status.exitstatus).to eq(0)
      workers << spawn_fault_worker(batch_ep, result_ep, concurrency: 2, prefetch: 10)
      ids.concat(Array.new(20) { |i| TaskerCore.create_task(name: "deploy_chain", context: { "n" => ids.size + i }) })
    end

    rows = expect_finished_exactly_once(ids, timeout: 120)
    expect(rows.size).to eq(ids.size * 3)
    steps = conn.exec("SELECT failures, lost_attempts FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])",
                      [ids]).to_a
    expect(steps.map { |s| s["failures"] }.uniq).to eq([0])
    # a batch that crossed a stopping worker's last heartbeat is the only loss a deploy may cost: never twice
    expect(steps.map { |s| s["lost_attempts"] }.max).to be <= 1
    handed_back = conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE reason = 'draining'")
                      .first["n"].to_i
    expect(handed_back).to be_positive
    expect_live_after_fault(orch, template_name: "deploy_chain")
  end
end
