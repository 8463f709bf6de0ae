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
end
