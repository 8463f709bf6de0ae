# frozen_string_literal: true

require "json"
require "yaml"
require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/compat_handlers"

RSpec.describe "Discovery failover", :db do
  let(:name) { "orders-#{SecureRandom.hex(3)}" }
  let(:script) { File.expand_path("../fixtures/discovery_orchestrator.rb", __dir__) }

  before do
    use_templates(template("chain", [
                             step("a", handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 250 }, timeout_ms: 2000),
                             step("b", ["a"], handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 250 }, timeout_ms: 2000)
                           ]))
  end

  after { cleanup_durable }

  # handle: extra OrchestrationHandle.new keywords (CURVE keys).
  def spawn_discovering_orchestrator(batch, result, handle: {})
    r, w = IO.pipe
    env = { "TASKER_DISCOVERY_HANDLE_OPTS" => JSON.generate(handle) }
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), script,
                        db_url, batch, result, name, "1.0", out: w, pgroup: true)
    w.close
    (@spawned_pids ||= []) << pid
    [pid, r]
  end

  # curve: {server_public_key:, client_secret_key:} turns CURVE on.
  def spawn_discovering_worker(curve: nil)
    dir = Dir.mktmpdir("tasker_discovery")
    (@tmp_dirs ||= []) << dir
    config = File.join(dir, "tasker-config.yml")
    zeromq = { "heartbeat_interval_ms" => 200 }
    zeromq["curve"] = { "enabled" => true, "server_public_key" => curve[:server_public_key] } if curve
    File.write(config, { "default" => { "zeromq" => zeromq,
                                        "discovery" => { "name" => name, "ttl_ms" => 1000 },
                                        "logging" => { "level" => "error" } } }.to_yaml)
    env = { "TASKER_CONFIG_PATH" => config, "TASKER_ENV" => "test", "DATABASE_URL" => db_url }
    env["TASKER_CURVE_CLIENT_SECRET_KEY"] = curve[:client_secret_key] if curve
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), DurableHelpers::WORKER_EXE,
                        "--handlers", DurableHelpers::DURABLE_HANDLERS, "--concurrency", "4", pgroup: true)
    (@spawned_pids ||= []) << pid
    pid
  end

  # Steps of the tasks the orchestrator process pid sent out.
  def steps_enqueued_by(conn, ids, pid)
    conn.exec(<<~SQL, [ids, "%-#{pid}-%"]).first["n"].to_i
      SELECT count(DISTINCT step_id) AS n FROM tasker_workflow_step_transitions
       WHERE task_id = ANY($1::bigint[]) AND reason = 'claimed' AND owner LIKE $2
    SQL
  end

  # docs/protocol.md section 15: the Python worker finds the orchestrator in
  # PostgreSQL and follows the failover as the Ruby worker does.
  it "moves the Python worker to a second orchestrator when the first is killed, with no step lost" do
    python = ["/usr/bin/python3", "python3"].find do |candidate|
      system(candidate, "-c", "import zmq, msgpack, psycopg2", out: File::NULL, err: File::NULL)
    end
    skip "no python3 with pyzmq, msgpack and psycopg2" unless python

    use_templates(template("py_chain", [
                             step("a", handler: "Python::Sleep", handler_config: { "sleep_ms" => 200 }, timeout_ms: 2000),
                             step("b", ["a"], handler: "Python::Sleep", handler_config: { "sleep_ms" => 200 }, timeout_ms: 2000)
                           ]))
    conn = connect
    ids = Array.new(30) { |i| TaskerCore.create_task(name: "py_chain", context: { "n" => i }) }
    a_pid, a_out = spawn_discovering_orchestrator(tcp_endpoint, tcp_endpoint)
    expect(a_out.wait_readable(30) && a_out.gets&.chomp).to eq("ready")
    worker = Process.spawn(python, File.join(SpecHelpers::ROOT, "examples", "python_worker", "worker.py"),
                           "--discovery", name, "--database-url", db_url, "--concurrency", "4",
                           "--heartbeat-interval-ms", "200", err: ENV["SPEC_LOG"] ? :err : File::NULL, pgroup: true)
    (@spawned_pids ||= []) << worker
    wait_until(timeout: 30, message: "some tasks done through the first orchestrator") do
      task_states(conn, ids)["complete"].to_i >= 3
    end

    b_batch = tcp_endpoint
    b_pid, b_out = spawn_discovering_orchestrator(b_batch, tcp_endpoint)
    kill9(a_pid)
    expect(b_out.wait_readable(30) && b_out.gets&.chomp).to eq("ready")
    expect(TaskerCore::Discovery.lookup(name, url: db_url).batch_endpoint).to eq(b_batch)

    expect_finished_exactly_once(ids, c: conn, timeout: 60)
    expect(steps_enqueued_by(conn, ids, b_pid)).to be_positive
    languages = conn.exec("SELECT output FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])", [ids])
                    .map { |r| TaskerCore::Codec.unpack(r["output"])["language"] }.uniq
    expect(languages).to eq(["python"])
  end

  it "moves a worker to a second orchestrator when the first is killed, with no step lost" do
    conn = connect
    ids = Array.new(40) { |i| TaskerCore.create_task(name: "chain", context: { "n" => i }) }
    a_batch = tcp_endpoint
    a_pid, a_out = spawn_discovering_orchestrator(a_batch, tcp_endpoint)
    expect(a_out.wait_readable(30) && a_out.gets&.chomp).to eq("ready")
    spawn_discovering_worker
    wait_until(timeout: 30, message: "some tasks done through the first orchestrator") do
      task_states(conn, ids)["complete"].to_i >= 3
    end

    b_batch = tcp_endpoint
    b_pid, b_out = spawn_discovering_orchestrator(b_batch, tcp_endpoint) # a standby: waits for the name
    kill9(a_pid)
    expect(b_out.wait_readable(30) && b_out.gets&.chomp).to eq("ready")
    expect(TaskerCore::Discovery.lookup(name, url: db_url).batch_endpoint).to eq(b_batch)

    wait_for_tasks(conn, ids, timeout: 60)
    steps = conn.exec("SELECT state, count(*) AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) GROUP BY state",
                      [ids]).to_h { |r| [r["state"], r["n"]] }
    expect(steps).to eq("complete" => 80)
    # the second orchestrator really did the rest through the same worker
    expect(steps_enqueued_by(conn, ids, b_pid)).to be_positive
  end

  # The worker's move to the new orchestrator reopens its sockets with the
  # same settings: without its CURVE keys the new orchestrator (a CURVE
  # server) would refuse it and the tasks would never finish.
  it "moves a CURVE worker to a second CURVE orchestrator, every task finishing exactly once" do
    conn = connect
    server_pub, server_sec = TaskerCore::Curve.keypair
    worker_pub, worker_sec = TaskerCore::Curve.keypair
    handle = { curve_secret_key: server_sec, curve_allowed_client_keys: [worker_pub] }
    ids = Array.new(30) { |i| TaskerCore.create_task(name: "chain", context: { "n" => i }) }
    a_pid, a_out = spawn_discovering_orchestrator(tcp_endpoint, tcp_endpoint, handle: handle)
    expect(a_out.wait_readable(30) && a_out.gets&.chomp).to eq("ready")
    spawn_discovering_worker(curve: { server_public_key: server_pub, client_secret_key: worker_sec })
    wait_until(timeout: 30, message: "some tasks done through the first orchestrator") do
      task_states(conn, ids)["complete"].to_i >= 3
    end

    b_pid, b_out = spawn_discovering_orchestrator(tcp_endpoint, tcp_endpoint, handle: handle)
    kill9(a_pid)
    expect(b_out.wait_readable(30) && b_out.gets&.chomp).to eq("ready")
    expect_finished_exactly_once(ids, c: conn)
    expect(steps_enqueued_by(conn, ids, b_pid)).to be_positive
    # Liveness after the failover: new work runs, and TERM stops the new orchestrator.
    expect_live_after_fault(b_pid, template_name: "chain", c: conn)
  end
end
