# frozen_string_literal: true

require "tmpdir"
require "yaml"

# The C orchestration handle and real worker processes (exe/tasker-worker)
# over TCP: addressing, credit, streaming, completions and worker loss.
RSpec.describe "orchestration over TCP", :no_valgrind do
  HANDLERS = File.expand_path("../fixtures/integration_handlers.rb", __dir__)
  WORKER_EXE = File.expand_path("../../exe/tasker-worker", __dir__)

  before(:all) do
    @config_dir = Dir.mktmpdir("tasker_core_integration")
    @config_path = File.join(@config_dir, "tasker-config.yml")
    File.write(@config_path, {
      "default" => { "zeromq" => { "heartbeat_interval_ms" => 200, "heartbeat_timeout_ms" => 1500 },
                     "logging" => { "level" => "error" } }
    }.to_yaml)
  end

  after(:all) { FileUtils.rm_rf(@config_dir) }

  after { @handle&.close }

  def new_handle(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*")
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: batch_endpoint, result_endpoint: result_endpoint,
                                                  heartbeat_timeout_ms: 1500)
  end

  def spawn_worker(handle_or_endpoints, concurrency: 10)
    endpoints = handle_or_endpoints.is_a?(Hash) ? handle_or_endpoints : handle_or_endpoints.zeromq_config
    env = { "TASKER_CONFIG_PATH" => @config_path, "TASKER_ENV" => "test" }
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), WORKER_EXE,
                        "--handlers", HANDLERS, "--concurrency", concurrency.to_s,
                        "--batch-endpoint", endpoints["batch_endpoint"],
                        "--result-endpoint", endpoints["result_endpoint"], pgroup: true)
    (@spawned_pids ||= []) << pid
    pid
  end

  # Pumps results until the handle sees `count` live workers.
  def wait_for_workers(handle, count, results = [])
    wait_until(timeout: 30, message: "#{count} live workers") do
      results.concat(handle.receive_results(timeout_ms: 50))
      handle.workers.size >= count
    end
  end

  def step(id, handler, timeout_ms: 10_000)
    { "step_id" => id, "task_id" => id / 10, "step_name" => "step_#{id}", "handler" => handler,
      "handler_config" => {}, "attempt" => 1, "timeout_ms" => timeout_ms, "context" => { "n" => id },
      "dependency_results" => {} }
  end

  # Mixes handlers that succeed, raise and hang past their timeout.
  def mixed_steps(count)
    (1..count).map do |id|
      case id % 20
      when 0 then step(id, "IntegrationHandlers::Hang", timeout_ms: 100)
      when 1, 2 then step(id, "IntegrationHandlers::Raise")
      else step(id, "IntegrationHandlers::Succeed")
      end
    end
  end

  # Publishes every step in batches as capacity allows and collects results
  # until each step has its partial and each batch its completion. Returns
  # the results in arrival order and the worker each batch went to.
  def run_steps(handle, steps, batch_size: 10, results: [], on_progress: nil)
    pending = steps.each_slice(batch_size).map.with_index do |slice, i|
      { "batch_id" => "b#{i}-#{rand(1 << 30)}", "steps" => slice }
    end
    sent = {}
    wait_until(timeout: 120, message: "every result") do
      while (batch = pending.first)
        begin
          sent[batch["batch_id"]] = handle.publish_batch(batch)
          pending.shift
        rescue TaskerCore::NoWorkersError
          break
        end
      end
      results.concat(handle.receive_results(timeout_ms: 20))
      on_progress&.call(results)
      completions = results.count { |r| r["type"] == "batch_completion" }
      pending.empty? && completions >= sent.size
    end
    [results, sent]
  end

  def check_exactly_once(steps, results, sent)
    partials = results.select { |r| r["type"] == "partial_result" }
    completions = results.select { |r| r["type"] == "batch_completion" }

    expect(partials.map { |r| r["step_id"] }.tally.values.uniq).to eq([1])
    expect(partials.map { |r| r["step_id"] }.sort).to eq(steps.map { |s| s["step_id"] }.sort)
    expect(completions.map { |r| r["batch_id"] }.sort).to eq(sent.keys.sort)

    by_step = partials.to_h { |r| [r["step_id"], r] }
    steps.each do |s|
      r = by_step.fetch(s["step_id"])
      case s["handler"]
      when "IntegrationHandlers::Succeed"
        expect(r).to include("status" => "complete")
        expect(r["output"]).to include("step_id" => s["step_id"], "task_id" => s["task_id"])
      when "IntegrationHandlers::Raise"
        expect(r).to include("status" => "error")
        expect(r["error"]).to include("class" => "ArgumentError", "retryable" => true)
      when "IntegrationHandlers::Hang"
        expect(r).to include("status" => "error")
        expect(r["error"]).to include("class" => "TaskerCore::StepTimeoutError", "retryable" => true)
      end
    end

    # Each batch went to one worker, which sent all of its partials, then its completion.
    completions.each do |c|
      worker = sent.fetch(c["batch_id"])
      expect(c["worker_id"]).to eq(worker)
      batch_partials = partials.select { |r| r["batch_id"] == c["batch_id"] }
      expect(batch_partials.map { |r| r["worker_id"] }.uniq).to eq([worker])
      expect(batch_partials.map { |r| results.index(r) }.max).to be < results.index(c)
    end
    partials
  end

  it "runs 1,000 mixed steps on one worker, each with exactly one result" do
    handle = new_handle
    spawn_worker(handle)
    wait_for_workers(handle, 1)
    steps = mixed_steps(1000)
    results, sent = run_steps(handle, steps)
    check_exactly_once(steps, results, sent)
  end

  it "spreads 1,000 mixed steps over 3 workers, none run twice" do
    handle = new_handle
    3.times { spawn_worker(handle) }
    wait_for_workers(handle, 3)
    steps = mixed_steps(1000)
    results, sent = run_steps(handle, steps)
    partials = check_exactly_once(steps, results, sent)
    expect(partials.map { |r| r["worker_id"] }.uniq.size).to eq(3)
    expect(sent.values.uniq.sort).to eq(handle.workers.map { |w| w["id"] }.sort)
  end

  it "streams each partial as its step finishes, before the batch's slow step ends" do
    handle = new_handle
    spawn_worker(handle)
    wait_for_workers(handle, 1)
    steps = [step(1, "IntegrationHandlers::Hang", timeout_ms: 1000)] +
            (2..6).map { |id| step(id, "IntegrationHandlers::Succeed") }
    results, = run_steps(handle, steps, batch_size: 6)
    order = results.map { |r| [r["type"], r["step_id"]] }
    hang_at = order.index(["partial_result", 1])
    (2..6).each { |id| expect(order.index(["partial_result", id])).to be < hang_at }
    expect(order.last).to eq(["batch_completion", nil])
  end

  it "gives work to workers started before the handle binds and to one that joins mid-run" do
    endpoints = { "batch_endpoint" => tcp_endpoint, "result_endpoint" => tcp_endpoint }
    early = spawn_worker(endpoints)
    handle = new_handle(**endpoints.transform_keys(&:to_sym))
    results = []
    wait_for_workers(handle, 1, results)
    early_id = handle.workers.first["id"]
    expect(handle.workers.first["pid"]).to eq(early)

    first, sent_first = run_steps(handle, (1..100).map { |id| step(id, "IntegrationHandlers::Succeed") })
    expect(sent_first.values.uniq).to eq([early_id])

    spawn_worker(handle)
    wait_for_workers(handle, 2, first)
    late_id = (handle.workers.map { |w| w["id"] } - [early_id]).first
    steps = (101..400).map { |id| step(id, "IntegrationHandlers::Succeed") }
    results, sent = run_steps(handle, steps)
    check_exactly_once(steps, results, sent)
    expect(sent.values).to include(late_id, early_id)
  end

  it "reports a kill -9'd worker as lost, with the steps it had in flight" do
    handle = new_handle
    2.times { spawn_worker(handle) }
    wait_for_workers(handle, 2)
    steps = (1..5).map { |id| step(id, "IntegrationHandlers::Hang", timeout_ms: 60_000) }
    worker_id = handle.publish_batch({ "batch_id" => "doomed", "steps" => steps })
    victim = handle.workers.find { |w| w["id"] == worker_id }
    expect(victim["in_flight"]).to eq(5)

    Process.kill(:KILL, victim["pid"])
    lost = nil
    wait_until(timeout: 30, message: "worker_lost") do
      lost = handle.receive_results(timeout_ms: 100).find { |r| r["type"] == "worker_lost" }
    end
    expect(lost["worker_id"]).to eq(worker_id)
    expect(lost["in_flight"].map { |s| s["step_id"] }.sort).to eq([1, 2, 3, 4, 5])
    expect(lost["in_flight"].map { |s| s["batch_id"] }.uniq).to eq(["doomed"])
    expect(handle.workers.map { |w| w["id"] }).not_to include(worker_id)
    expect(handle.workers.size).to eq(1)
  end
end
