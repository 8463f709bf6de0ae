# frozen_string_literal: true

require_relative "cli_helpers"

RSpec.describe "tasker orchestrator and tasker worker", :db do
  include CLIHelpers

  before { clear_workers }

  def loop_available?
    TaskerCore::Internal::OrchestrationManager.method_defined?(:start_orchestration)
  end

  def endpoints_env
    { "TASKER_BATCH_ENDPOINT" => tcp_endpoint, "TASKER_RESULT_ENDPOINT" => tcp_endpoint }
  end

  # Spawns `tasker *args` with stderr in a file; returns [pid, path].
  def spawn_tasker(*args, env:)
    log = File.join(Dir.mktmpdir("tasker_cli"), "stderr.log")
    pid = Process.spawn(CLIHelpers::CLEAN_ENV.merge(env), *tasker_command(*args), out: log, err: [:child, :out],
                        chdir: CLIHelpers::ROOT, pgroup: true)
    (@spawned_pids ||= []) << pid
    [pid, log]
  end

  def exit_status(pid)
    wait_until(timeout: 30, message: "tasker to exit") { Process.waitpid2(pid, Process::WNOHANG)&.last }
  end

  it "fails in one line, exit 1, without a database" do
    r = tasker("orchestrator")
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines).to eq(["tasker orchestrator: no database is configured: set DATABASE_URL (or database.url " \
                               "in the configuration file) and run `tasker db:migrate`"])
  end

  %w[TERM INT].each do |signal|
    it "runs the loop in the foreground and stops cleanly on #{signal}, exit 0" do
      skip "this build has no orchestration loop (branch loop not merged)" unless loop_available?

      pid, log = spawn_tasker("orchestrator", "--stats-interval", "0", env: db_env.merge(endpoints_env))
      wait_until(timeout: 20, message: "the orchestrator to start") { File.read(log).include?("running (pid #{pid}") }
      Process.kill(signal, pid)
      status = exit_status(pid)
      expect(status.exitstatus).to eq(0), File.read(log)
      expect(File.read(log)).to match(/tasker orchestrator: stopped \(claimed \d+/)
    end
  end

  it "runs a task to completion with `tasker worker` processes" do
    skip "this build has no orchestration loop (branch loop not merged)" unless loop_available?

    env = db_env.merge(endpoints_env)
    orch, orch_log = spawn_tasker("orchestrator", "--stats-interval", "0", env: env)
    wait_until(timeout: 20, message: "the orchestrator to start") { File.read(orch_log).include?("running") }
    worker, worker_log = spawn_tasker("worker", "--handlers", File.join(CLIHelpers::ROOT, "examples/order_fulfilment/handlers.rb"),
                                      "--concurrency", "4", env: env)
    wait_until(timeout: 20, message: "the worker to be live") do
      JSON.parse(tasker("status", "--json", env: env).out)["workers"]&.any?
    end
    id = create_order_task(10) # order 10 fails its payment once, then succeeds
    task = wait_until(timeout: 30, message: "the task to finish") do
      t = TaskerCore.task(id)
      t if %w[complete error cancelled].include?(t[:status])
    end
    expect(task[:status]).to eq("complete"), File.read(worker_log)
    payment = task[:steps].find { |s| s[:name] == "charge_payment" }
    expect(payment).to include(attempts: 2, state: "complete")
    expect(task[:steps].find { |s| s[:name] == "notify_customer" }[:output]).to include("tracking_number" => "PostNL-00000010")

    r = tasker("status", "--json", env: env)
    expect(JSON.parse(r.out)["workers"].map { |w| w["capacity"] }).to eq([4])

    [worker, orch].each do |pid|
      Process.kill(:TERM, pid)
      expect(exit_status(pid).exitstatus).to eq(0)
    end
  end
  it "logs JSON through TaskerCore.logger: workers log each step at debug and a failed attempt at warn with its fields" do
    skip "this build has no orchestration loop (branch loop not merged)" unless loop_available?

    env = db_env.merge(endpoints_env).merge("TASKER_LOG_FORMAT" => "json", "TASKER_LOG_LEVEL" => "debug")
    orch, orch_log = spawn_tasker("orchestrator", "--stats-interval", "0.2", env: env)
    wait_until(timeout: 20, message: "the orchestrator to start") { File.read(orch_log).include?("running") }
    worker, worker_log = spawn_tasker("worker", "--handlers", File.join(CLIHelpers::ROOT, "examples/order_fulfilment/handlers.rb"),
                                      "--concurrency", "2", "--worker-id", "w-json", env: env)
    id = create_order_task(10) # order 10 fails its payment once, then succeeds
    wait_until(timeout: 30, message: "the task to finish") { TaskerCore.task(id)[:status] == "complete" }
    wait_until(timeout: 20, message: "the orchestrator to log its counters") do
      File.read(orch_log).include?("completed 5,")
    end
    [worker, orch].each do |pid|
      Process.kill(:TERM, pid)
      expect(exit_status(pid).exitstatus).to eq(0)
    end

    entries = File.read(worker_log).lines.map { |l| JSON.parse(l) }
    expect(entries.map { |e| e["time"] }).to all(match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/))
    failed = entries.select { |e| e["level"] == "warn" && e["step_name"] == "charge_payment" }
    expect(failed.size).to eq(1)
    expect(failed.first).to include("task_id" => id, "attempt" => 1, "worker_id" => "w-json",
                                    "error_class" => "TaskerCore::RetryableError")
    expect(failed.first["message"]).to include("payment gateway timed out for order 10")
    steps = entries.select { |e| e["level"] == "debug" && e["message"]&.end_with?(" complete") }
    expect(steps.map { |e| e["step_name"] }.sort).to eq(%w[charge_payment notify_customer reserve_inventory ship_order
                                                             validate_order])
    expect(steps.map { |e| e["step_id"] }).to all(be_a(Integer))

    lines = File.read(orch_log).lines.map { |l| JSON.parse(l) }
    expect(lines.map { |e| e["message"] }).to include(a_string_starting_with("tasker orchestrator: running (pid #{orch}"))
    # Logged on change only: the same totals never twice in a row.
    totals = lines.map { |e| e["message"] }.grep(/\Atasker orchestrator: claimed/)
    expect(totals).not_to be_empty
    expect(totals.each_cons(2).select { |a, b| a == b }).to eq([])
  end

  it "stops at once on a second INT while the first one is still stopping" do
    skip "this build has no orchestration loop (branch loop not merged)" unless loop_available?

    pid, log = spawn_tasker("orchestrator", "--stats-interval", "0", env: db_env.merge(endpoints_env))
    wait_until(timeout: 20, message: "the orchestrator to start") { File.read(log).include?("running (pid #{pid}") }
    # Stopping writes to tasker_workers: hold it so the first stop cannot finish.
    blocker = connect
    blocker.exec("BEGIN")
    blocker.exec("LOCK TABLE tasker_workers IN ACCESS EXCLUSIVE MODE")
    Process.kill(:INT, pid)
    wait_until(timeout: 20, message: "the orchestrator to start stopping") { File.read(log).include?("stopping") }
    Process.kill(:INT, pid)
    status = exit_status(pid)
    expect(status.exitstatus).to eq(130), File.read(log)
    expect(File.read(log)).to include("second INT: exiting at once")
    expect(blocker.exec("SELECT 1 AS one").first["one"]).to eq(1) # the lock was still held when it exited
  ensure
    blocker&.exec("ROLLBACK")
  end
end
