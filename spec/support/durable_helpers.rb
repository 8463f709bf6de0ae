# frozen_string_literal: true

require "tmpdir"
require "yaml"

# Worker processes and orchestrators for the durable orchestration specs.
module DurableHelpers
  DURABLE_HANDLERS = File.expand_path("../fixtures/durable_handlers.rb", __dir__)
  ORCHESTRATOR_SCRIPT = File.expand_path("../fixtures/orchestrator_process.rb", __dir__)
  WORKER_EXE = File.expand_path("../../exe/tasker-worker", __dir__)

  def worker_config_path
    @worker_config_path ||= begin
      dir = Dir.mktmpdir("tasker_durable")
      (@tmp_dirs ||= []) << dir
      File.join(dir, "tasker-config.yml").tap do |path|
        File.write(path, { "default" => { "zeromq" => { "heartbeat_interval_ms" => 200 },
                                          "logging" => { "level" => "error" } } }.to_yaml)
      end
    end
  end

  # handlers: the handler files it loads; queues: --queues (nil: worker.queues).
  def spawn_durable_worker(batch_endpoint, result_endpoint, concurrency: 10, handlers: [DURABLE_HANDLERS], queues: nil,
                           prefetch: nil)
    env = { "TASKER_CONFIG_PATH" => worker_config_path, "TASKER_ENV" => "test" }
    args = handlers.flat_map { |h| ["--handlers", h] }
    args += ["--queues", Array(queues).join(",")] if queues
    args += ["--prefetch", prefetch.to_s] if prefetch
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), WORKER_EXE, *args,
                        "--concurrency", concurrency.to_s,
                        "--batch-endpoint", batch_endpoint, "--result-endpoint", result_endpoint, pgroup: true)
    (@spawned_pids ||= []) << pid
    pid
  end

  # Returns [pid, stdout reader]; waits for "ready". env: e.g. a
  # TASKER_CONFIG_PATH for its configuration.
  def spawn_orchestrator(url, batch_endpoint, result_endpoint, lease_ms: 500, env: {})
    r, w = IO.pipe
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), ORCHESTRATOR_SCRIPT,
                        url, batch_endpoint, result_endpoint, lease_ms.to_s, out: w, pgroup: true)
    w.close
    (@spawned_pids ||= []) << pid
    raise "orchestrator did not start" unless r.wait_readable(30) && r.gets&.chomp == "ready"

    [pid, r]
  end

  def kill9(pid)
    Process.kill("KILL", pid)
    Process.wait(pid)
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  end

  # Stops the spec's in-process orchestrator (@handle), then every process
  # spawned and temporary folder.
  def cleanup_durable
    if @handle && !@handle.closed?
      @handle.stop_orchestration
      @handle.close
    end
    (@spawned_pids || []).each { |pid| kill9(pid) }
    @spawned_pids = []
    (@tmp_dirs || []).each { |d| FileUtils.rm_rf(d) }
    @tmp_dirs = []
    @worker_config_path = nil
  end

  def task_states(conn, ids)
    conn.exec("SELECT state, count(*) AS n FROM tasker_tasks WHERE id = ANY($1::bigint[]) GROUP BY state",
              ["{#{ids.join(',')}}"]).to_h { |r| [r["state"], r["n"]] }
  end

  def wait_for_tasks(conn, ids, state: "complete", timeout: 60)
    wait_until(timeout: timeout, interval: 0.05, message: "#{ids.size} tasks #{state}") do
      task_states(conn, ids)[state].to_i == ids.size
    end
  end

  # Steps whose output was applied more than once (from the transitions).
  def steps_completed_twice(conn)
    conn.exec(<<~SQL).to_a
      SELECT step_id, count(*) AS n FROM tasker_workflow_step_transitions
       WHERE to_state = 'complete' GROUP BY step_id HAVING count(*) > 1
    SQL
  end
end

RSpec.configure { |c| c.include DurableHelpers }
