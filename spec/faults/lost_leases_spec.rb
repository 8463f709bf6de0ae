# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# An orchestrator paused (SIGSTOP) while it holds steps: their claims expire
# and the other orchestrator on the same database requeues them. An expired
# claim is a lost attempt (docs/protocol.md section 5), not a handler
# failure: steps that may not be retried still run, once, and every task
# completes.
RSpec.describe "lost leases", :db, :no_valgrind do
  let(:conn) { connect }
  let(:pause_s) { 10 }

  after do
    @stopped&.each do |pid|
      Process.kill("CONT", pid)
    rescue Errno::ESRCH
      nil
    end
    cleanup_durable
  end

  def in_flight_of(pid)
    conn.exec(<<~SQL, ["%-#{pid}-%"]).first["n"].to_i
      SELECT count(*) AS n FROM tasker_workflow_steps
       WHERE state IN ('enqueued', 'in_progress') AND claimed_by LIKE $1
    SQL
  end

  it "requeues a paused orchestrator's expired claims as lost attempts, and every task completes once" do
    once = { "retryable" => false }
    use_templates(template("lost_pair", [
                             step("a", [], handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 300 },
                                           timeout_ms: 2000, retry: once),
                             step("b", ["a"], handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 300 },
                                              timeout_ms: 2000, retry: once)
                           ]))
    eps = Array.new(2) { [tcp_endpoint, tcp_endpoint] }
    paused, survivor = eps.map { |be, re| spawn_orchestrator_process(be, re, lease_ms: 500) }
    eps.each { |be, re| 2.times { spawn_fault_worker(be, re, concurrency: 5) } }
    ids = Array.new(60) { |i| TaskerCore.create_task(name: "lost_pair", context: { "n" => i }) }

    wait_until(timeout: 30, interval: 0.05, message: "the first orchestrator holds steps") { in_flight_of(paused).positive? }
    Process.kill("STOP", paused)
    (@stopped ||= []) << paused
    paused_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    # The claims it holds expire (step timeout 2 s + lease 0.5 s) and the other one requeues them.
    wait_until(timeout: pause_s, interval: 0.1, message: "the paused orchestrator's claims requeued") { in_flight_of(paused).zero? }
    left = pause_s - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - paused_at)
    sleep left if left.positive? # the rest of the pause
    Process.kill("CONT", paused)
    @stopped.delete(paused)

    expect_finished_exactly_once(ids)
    lost = conn.exec(<<~SQL, ["%-#{paused}-%"]).first["n"].to_i
      SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE reason = 'lost' AND owner LIKE $1
    SQL
    expect(lost).to be_positive
    errors = conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE last_error IS NOT NULL " \
                       "OR failures > 0 OR state <> 'complete'").first["n"].to_i
    expect(errors).to eq(0)

    expect_live_after_fault(survivor, template_name: "lost_pair")
    expect_stops_on_term(paused)
  end
end
