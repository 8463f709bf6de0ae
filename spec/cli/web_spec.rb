# frozen_string_literal: true

require_relative "cli_helpers"
require "net/http"

RSpec.describe "tasker web and tasker orchestrator --metrics-port", :db do
  include CLIHelpers

  before { clear_workers }

  # `tasker ARGS` as a child process, stdout and stderr into a file: [pid, log path].
  def start_tasker(*args, env: db_env)
    log = File.join(Dir.mktmpdir("tasker_web"), "out.log")
    pid = spawn_ruby("load #{CLIHelpers::EXE.inspect}", *args, env: CLIHelpers::CLEAN_ENV.merge(env),
                                                                  out: log, err: [:child, :out])
    [pid, log]
  end

  def served_url(log, pattern)
    wait_until(timeout: 30, message: "the server to listen") { File.read(log)[pattern, 1] }
  end

  def stop(pid)
    Process.kill("TERM", pid)
    wait_until(timeout: 20, message: "tasker to exit") { Process.waitpid2(pid, Process::WNOHANG)&.last }
  end

  it "serves the dashboard until TERM, exit 0; --read-only shows no action" do
    use_templates(template("one", [step("a")]))
    id = TaskerCore.create_task(name: "one")
    pid, log = start_tasker("web", "--port", "0", "--read-only")
    url = served_url(log, %r{serving the dashboard on (http://127\.0\.0\.1:\d+)/})
    page = Net::HTTP.get_response(URI("#{url}/tasks/#{id}"))
    expect(page.code).to eq("200")
    expect(page.body).to include("default/one@", "read-only")
    expect(page.body).not_to include("Cancel task")
    expect(Net::HTTP.get_response(URI("#{url}/metrics")).body).to include('tasker_tasks{state="pending"} 1')
    expect(stop(pid).exitstatus).to eq(0), File.read(log)
    expect(File.read(log)).to include("tasker web: stopped")
  end

  it "refuses a port out of range, exit 2" do
    r = tasker("web", "--port", "70000", env: db_env)
    expect(r.exitstatus).to eq(2)
    expect(r.err).to include("--port must be between 0 and 65535")
  end

  it "serves /metrics next to the orchestration loop, with the handle's counters" do
    skip "this build has no orchestration loop" unless TaskerCore::Internal::OrchestrationManager.method_defined?(:start_orchestration)

    env = db_env.merge("TASKER_BATCH_ENDPOINT" => tcp_endpoint, "TASKER_RESULT_ENDPOINT" => tcp_endpoint)
    pid, log = start_tasker("orchestrator", "--stats-interval", "0", "--metrics-port", "0", env: env)
    url = served_url(log, %r{Prometheus metrics on (http://127\.0\.0\.1:\d+)/metrics})
    body = Net::HTTP.get_response(URI("#{url}/metrics")).body
    expect(body).to include("# TYPE tasker_database_errors_total counter", "tasker_database_reconnects_total 0",
                            "# TYPE tasker_messages_dropped_total counter", "tasker_steps_in_flight 0")
    expect(body).to match(/^tasker_messages_dropped_total\{reason="send_high_water_mark"\} 0$/)
    expect(Net::HTTP.get_response(URI("#{url}/other")).code).to eq("404")
    expect(stop(pid).exitstatus).to eq(0), File.read(log)
  end
end
