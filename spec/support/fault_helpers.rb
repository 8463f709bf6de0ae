# frozen_string_literal: true

require "json"
require "tmpdir"
require "yaml"

# What every fault scenario ends with (docs/reliability.md): the exactly-once
# check, and two liveness checks: a task created after the fault completes,
# and the orchestrator process stops on TERM within 15 s.
module FaultHelpers
  FAULT_HANDLERS = File.expand_path("../fixtures/fault_handlers.rb", __dir__)
  FAULT_ORCHESTRATOR = File.expand_path("../fixtures/fault_orchestrator.rb", __dir__)
  TERM_LIMIT_S = 15

  # Every task reached a final state (complete unless told otherwise), and
  # each step has exactly one 'complete' transition if it is complete, none
  # otherwise: no output lost, none applied twice.
  def expect_finished_exactly_once(ids, state: "complete", c: conn, timeout: 90)
    wait_for_tasks(c, ids, state: state, timeout: timeout)
    rows = c.exec(<<~SQL, ["{#{ids.join(',')}}"]).to_a
      SELECT s.id, s.state,
             (SELECT count(*) FROM tasker_workflow_step_transitions t
               WHERE t.step_id = s.id AND t.to_state = 'complete') AS applied
        FROM tasker_workflow_steps s WHERE s.task_id = ANY($1::bigint[])
    SQL
    expect(rows).not_to be_empty
    bad = rows.reject { |r| r["applied"].to_i == (r["state"] == "complete" ? 1 : 0) }
    expect(bad).to eq([])
    expect(steps_completed_twice(c)).to be_empty
    rows
  end

  # A config file for workers (and the orchestrator fixture): fast heartbeats,
  # quiet logs, plus what the scenario changes under zeromq.
  def fault_config(zeromq = {}, extra = {})
    dir = Dir.mktmpdir("tasker_faults")
    File.chmod(0o700, dir)
    (@tmp_dirs ||= []) << dir
    File.join(dir, "tasker-config.yml").tap do |path|
      data = { "zeromq" => { "heartbeat_interval_ms" => 200, "heartbeat_timeout_ms" => 1500 }.merge(zeromq),
               "logging" => { "level" => "error" } }.merge(extra)
      File.write(path, { "default" => data }.to_yaml)
    end
  end

  # A worker process (exe/tasker-worker) on the given endpoints; handlers:
  # more handler files to load.
  def spawn_fault_worker(batch_endpoint, result_endpoint, config: fault_config, concurrency: 5, env: {}, err: File::NULL,
                         handlers: [], prefetch: 0)
    pid = Process.spawn({ "TASKER_CONFIG_PATH" => config, "TASKER_ENV" => "test" }.merge(env),
                        RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), DurableHelpers::WORKER_EXE,
                        "--handlers", DurableHelpers::DURABLE_HANDLERS, "--handlers", FAULT_HANDLERS,
                        *handlers.flat_map { |h| ["--handlers", h] }, "--prefetch", prefetch.to_s,
                        "--concurrency", concurrency.to_s, "--batch-endpoint", batch_endpoint,
                        "--result-endpoint", result_endpoint, pgroup: true, err: err)
    (@spawned_pids ||= []) << pid
    pid
  end

  # An orchestrator process (spec/fixtures/fault_orchestrator.rb). handle:
  # extra OrchestrationHandle.new keywords; config: a TASKER_CONFIG_PATH.
  # Returns its pid once its loop runs. TERM stops it.
  def spawn_orchestrator_process(batch_endpoint, result_endpoint, lease_ms: 500, handle: {}, config: nil, env: {}, err: nil)
    r, w = IO.pipe
    env = { "TASKER_FAULT_HANDLE_OPTS" => JSON.generate(handle), "TASKER_ENV" => "test" }.merge(env)
    env["TASKER_CONFIG_PATH"] = config if config
    opts = { out: w, pgroup: true }
    opts[:err] = err if err
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), FAULT_ORCHESTRATOR,
                        db_url, batch_endpoint, result_endpoint, lease_ms.to_s, **opts)
    w.close
    (@spawned_pids ||= []) << pid
    raise "orchestrator did not start" unless r.wait_readable(30) && r.gets&.chomp == "ready"

    pid
  end

  # Liveness after a fault: a task of template_name created now completes,
  # then the orchestrator process stops on TERM within 15 s.
  def expect_live_after_fault(orchestrator_pid, template_name:, c: conn, context: { "after_fault" => true })
    id = TaskerCore.create_task(name: template_name, context: context)
    expect_finished_exactly_once([id], c: c, timeout: 60)
    expect_stops_on_term(orchestrator_pid)
  end

  def expect_stops_on_term(pid)
    Process.kill("TERM", pid)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + TERM_LIMIT_S
    status = nil
    until (status = Process.wait(pid, Process::WNOHANG))
      break if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
    @spawned_pids&.delete(pid) if status
    expect(status).not_to be_nil, "the orchestrator (pid #{pid}) did not stop within #{TERM_LIMIT_S} s of TERM"
  end
end

RSpec.configure { |c| c.include FaultHelpers }
