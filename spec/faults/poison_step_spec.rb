# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# A poison step (it kills every worker that runs it) costs only itself
# (docs/reliability.md): it fails with StepLostError after
# orchestration.max_lost_attempts losses, while the ordinary steps that were
# in flight on the same workers lose at most two attempts each (a step lost
# twice is dispatched alone to an idle worker, docs/protocol.md section 5)
# and complete once.
RSpec.describe "a poison step", :db, :no_valgrind do
  let(:conn) { connect }
  let(:max_lost) { 5 }

  after do
    @reaper&.kill
    @reaper&.join
    cleanup_durable
  end

  # Workers that die are reaped and replaced, as a supervisor would.
  def keep_workers(count, be, re, config)
    workers = Array.new(count) { spawn_fault_worker(be, re, config: config, concurrency: 5) }
    @respawned = 0
    @reaper = Thread.new do
      loop do
        workers.each_with_index do |pid, i|
          next unless Process.wait(pid, Process::WNOHANG)

          @spawned_pids.delete(pid)
          @respawned += 1
          workers[i] = spawn_fault_worker(be, re, config: config, concurrency: 5)
        end
        sleep 0.05
      end
    end
  end

  it "fails only the poison steps, with StepLostError; every ordinary task completes once" do
    use_templates(template("poison", [step("crash", handler: "FaultHandlers::Crash", timeout_ms: 5000)]),
                  template("ordinary", [step("nap", handler: "FaultHandlers::Nap", timeout_ms: 5000)]))
    config = fault_config({}, "orchestration" => { "max_lost_attempts" => max_lost })
    be, re = tcp_endpoint, tcp_endpoint
    orchestrator = spawn_orchestrator_process(be, re, lease_ms: 2000, config: config)
    keep_workers(3, be, re, config)

    # Created together, so that the poison steps share batches with ordinary ones.
    ids = Array.new(103) { |i| i % 35 == 0 ? nil : i }
    poison = []
    ordinary = []
    ids.each do |n|
      if n.nil?
        poison << TaskerCore.create_task(name: "poison", context: { "poison" => true })
      else
        ordinary << TaskerCore.create_task(name: "ordinary", context: { "n" => n })
      end
    end
    expect(poison.size).to eq(3)
    expect(ordinary.size).to eq(100)

    all = poison + ordinary
    wait_until(timeout: 120, interval: 0.1, message: "every task finished") do
      conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE id = ANY($1::bigint[]) AND state IN ('complete', 'error')",
                ["{#{all.join(',')}}"]).first["n"].to_i == all.size
    end
    failed = conn.exec(<<~SQL, ["{#{ordinary.join(',')}}"]).map { |r| [r["task_id"].to_i, r["lost_attempts"].to_i] }
      SELECT task_id, lost_attempts FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) AND state <> 'complete'
    SQL
    expect(failed).to eq([]), "ordinary tasks that did not complete ([task, lost attempts]): #{failed.inspect}"

    expect_finished_exactly_once(poison, state: "error")
    poison.each do |id|
      expect(TaskerCore.task(id)[:steps].first[:error]).to include("class" => "TaskerCore::StepLostError")
    end
    lost = conn.exec(<<~SQL, ["{#{poison.join(',')}}"]).map { |r| r["lost_attempts"].to_i }
      SELECT lost_attempts FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])
    SQL
    expect(lost).to all(eq(max_lost + 1))
    # Every isolated attempt (the third and later, alone on a worker) killed
    # a worker of its own; the first two may have shared one worker between
    # several poison steps, so at least two deaths for those.
    wait_until(timeout: 10, message: "a worker respawned per isolated poison attempt") do
      @respawned >= poison.size * (max_lost - 1) + 2
    end

    expect_finished_exactly_once(ordinary, timeout: 120)
    # Those that shared a worker with a poison step were lost with it, at
    # most twice each: after that they were isolated too.
    most = conn.exec("SELECT coalesce(max(lost_attempts), 0) AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])",
                     ["{#{ordinary.join(',')}}"]).first["n"].to_i
    expect(most).to be_between(0, 2)

    @reaper.kill
    expect_live_after_fault(orchestrator, template_name: "ordinary", context: { "n" => -1 })
  end
end
