# frozen_string_literal: true

require "tmpdir"
require "yaml"
require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# Faults, with nothing lost (docs/reliability.md). The native orchestration
# loop, a real PostgreSQL and real worker processes; each example ends by
# checking in the database that every task finished and that every step's
# output was applied exactly once (tasker_workflow_step_transitions).
RSpec.describe "faults", :db, :no_valgrind do
  FAULT_HANDLERS = File.expand_path("../fixtures/fault_handlers.rb", __dir__)
  let(:conn) { connect }

  after do
    if @handle && !@handle.closed?
      @handle.stop_orchestration
      @handle.close
    end
    cleanup_durable
  end

  def spawn_worker(config: fault_config, concurrency: 5, env: {})
    cfg = @handle.zeromq_config
    pid = Process.spawn({ "TASKER_CONFIG_PATH" => config, "TASKER_ENV" => "test" }.merge(env),
                        RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), DurableHelpers::WORKER_EXE,
                        "--handlers", DurableHelpers::DURABLE_HANDLERS, "--handlers", FAULT_HANDLERS,
                        "--concurrency", concurrency.to_s, "--batch-endpoint", cfg["batch_endpoint"],
                        "--result-endpoint", cfg["result_endpoint"], pgroup: true, err: File::NULL)
    (@spawned_pids ||= []) << pid
    pid
  end

  def spawn_fault_orchestrator(be, re, lease_ms: 500)
    r, w = IO.pipe
    pid = Process.spawn(RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"),
                        File.expand_path("../fixtures/fault_orchestrator.rb", __dir__),
                        db_url, be, re, lease_ms.to_s, out: w, pgroup: true)
    w.close
    (@spawned_pids ||= []) << pid
    raise "orchestrator did not start" unless r.wait_readable(30) && r.gets&.chomp == "ready"

    pid
  end

  def start_loop(lease_ms: 1000, batch_size: nil, **handle_opts)
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                                  heartbeat_timeout_ms: 1500, **handle_opts)
    @handle.start_orchestration(database_url: db_url, lease_ms: lease_ms, poll_interval_ms: 20, batch_size: batch_size)
  end

  def wait_for_workers(count)
    wait_until(timeout: 30, message: "#{count} live workers") { @handle.workers.size >= count }
  end

  def slow(name, deps = [], sleep_ms: 100, **extra)
    step(name, deps, handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => sleep_ms }, **extra)
  end

  it "loses nothing when a worker is killed with -9 mid-batch, 10 times in a run" do
    use_templates(template("pair", [slow("a"), slow("b", ["a"])]))
    start_loop
    3.times { spawn_worker }
    wait_for_workers(3)
    ids = Array.new(150) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    10.times do |round|
      victim = nil
      wait_until(timeout: 30, message: "a busy worker (round #{round})") do
        victim = @handle.workers.find { |w| w["in_flight"].positive? && @spawned_pids.include?(w["pid"]) }
      end
      kill9(victim["pid"])
      @spawned_pids.delete(victim["pid"])
      spawn_worker
    end
    expect_finished_exactly_once(ids)
    expect(@handle.stats["loop"]["redispatched"] + @handle.stats["loop"]["released"]).to be >= 1
  end

  it "loses nothing when the orchestrator is killed with -9 and restarted" do
    use_templates(template("pair", [slow("a", timeout_ms: 1000, retry: { "max_attempts" => 5 }),
                                    slow("b", ["a"], timeout_ms: 1000, retry: { "max_attempts" => 5 })]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    ids = Array.new(60) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    orch = spawn_fault_orchestrator(batch_ep, result_ep)
    2.times { spawn_durable_worker(batch_ep, result_ep, concurrency: 5) }
    wait_until(timeout: 30, message: "some steps complete") do
      conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE state = 'complete'").first["n"].to_i >= 10
    end
    kill9(orch)
    unfinished = conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE id = ANY($1::bigint[]) AND state <> 'complete'",
                           ["{#{ids.join(',')}}"]).first["n"].to_i
    expect(unfinished).to be > 0
    spawn_fault_orchestrator(batch_ep, result_ep)
    expect_finished_exactly_once(ids)
  end

  it "loses nothing when PostgreSQL is stopped for 5 seconds mid-run" do
    skip "needs the embedded cluster (DATABASE_URL is external)" unless DatabaseHelpers.pg_dir
    use_templates(template("chain", [slow("a", sleep_ms: 20), slow("b", ["a"], sleep_ms: 20), slow("c", ["b"], sleep_ms: 20)]))
    start_loop
    2.times { spawn_worker(concurrency: 10) }
    wait_for_workers(2)
    ids = Array.new(100) { |i| TaskerCore.create_task(name: "chain", context: { "n" => i }) }
    wait_until(timeout: 30, message: "some progress") { @handle.stats["loop"]["completed"] >= 20 }
    close_db_connections
    TaskerCore::EmbeddedPostgres.stop(dir: DatabaseHelpers.pg_dir)
    sleep 5 # the fault itself: the database is away this long while workers keep reporting
    expect(TaskerCore::EmbeddedPostgres.start(dir: DatabaseHelpers.pg_dir, database: "tasker_test")).to eq(db_url)
    ids << TaskerCore.create_task(name: "chain", context: { "n" => ids.size }) # on the pool's replaced connections
    c = connect
    expect_finished_exactly_once(ids, c: c)
    expect(@handle.stats["loop"]["db_reconnects"]).to be >= 1
  end

  describe "a hostile result channel" do
    curve = TaskerCore::Curve

    it "changes nothing in the database when blasted with garbage frames and forged results (CURVE on)" do
      server_pub, server_sec = curve.keypair
      worker_pub, worker_sec = curve.keypair
      use_templates(template("pair", [slow("a", sleep_ms: 50), slow("b", ["a"], sleep_ms: 50)]))
      start_loop(curve_secret_key: server_sec, curve_allowed_client_keys: [worker_pub])
      config = fault_config("curve" => { "enabled" => true, "server_public_key" => server_pub })
      2.times { spawn_worker(config: config, env: { "TASKER_CURVE_CLIENT_SECRET_KEY" => worker_sec }) }
      wait_for_workers(2)
      ids = Array.new(100) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
      forger = TaskerCore::Socket::Publisher.new(connect: @handle.zeromq_config["result_endpoint"], send_hwm: 0)
      sent = 0
      until task_states(conn, ids)["complete"].to_i == ids.size
        worker_ids = @handle.workers.map { |w| w["id"] }
        # Perfectly formed results for the steps in flight right now, from real worker ids.
        conn.exec("SELECT id, task_id, attempts FROM tasker_workflow_steps WHERE state IN ('enqueued', 'in_progress') LIMIT 50")
            .each do |r|
          msg = TaskerCore::Protocol.partial_result(batch_id: "forged", worker_id: worker_ids.sample || "w", step_id: r["id"].to_i,
                                                   task_id: r["task_id"].to_i, attempt: r["attempts"].to_i,
                                                   started_at: Time.now, finished_at: Time.now, output: { "forged" => true })
          forger.send_parts(TaskerCore::Protocol.encode(msg))
          forger.send_parts(["partial_result", Random.bytes(rand(1..200))])
          forger.send_parts([Random.bytes(3)])
          sent += 3
        end
      end
      expect(sent).to be > 0
      rows = expect_finished_exactly_once(ids)
      forged = conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE id = ANY($1::bigint[]) AND output IS NOT NULL " \
                         "AND position('forged'::bytea in output) > 0", ["{#{rows.map { |r| r['id'] }.join(',')}}"])
      expect(forged.first["n"].to_i).to eq(0)
      expect(@handle.stats[:handshakes][:allowed]).to be >= 2
    ensure
      forger&.close
    end

    it "counts and ignores garbage and forged results from unknown peers without CURVE" do
      use_templates(template("pair", [slow("a", sleep_ms: 50), slow("b", ["a"], sleep_ms: 50)]))
      start_loop
      2.times { spawn_worker }
      wait_for_workers(2)
      ids = Array.new(60) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
      forger = TaskerCore::Socket::Publisher.new(connect: @handle.zeromq_config["result_endpoint"], send_hwm: 0)
      until task_states(conn, ids)["complete"].to_i == ids.size
        50.times do |i|
          forged = TaskerCore::Protocol.partial_result(batch_id: "x", worker_id: "intruder", step_id: i + 1, task_id: 1,
                                                      attempt: 1, started_at: Time.now, finished_at: Time.now,
                                                      output: { "forged" => true })
          forger.send_parts(TaskerCore::Protocol.encode(forged))
          forger.send_parts(["partial_result", Random.bytes(rand(1..300))])
          forger.send_parts(["partial_result", "\xDF\xFF\xFF\xFF\xFF".b]) # a map header claiming 4 G entries
        end
        TaskerCore::Socket.select([], 10)
      end
      expect_finished_exactly_once(ids)
      expect(@handle.stats[:bad_messages].values.sum).to be > 0
    ensure
      forger&.close
    end
  end

  it "finishes tasks whose worker's handlers hang forever: steps time out and retry or fail per policy" do
    use_templates(
      template("hang_once", [step("h", [], handler: "DurableHandlers::HangOnce", timeout_ms: 300, retry: { "max_attempts" => 3 })]),
      template("hang_forever", [step("h", [], handler: "FaultHandlers::HangForever", timeout_ms: 300, retry: { "max_attempts" => 2 }),
                                step("after", ["h"])])
    )
    start_loop(lease_ms: 500)
    2.times { spawn_worker(concurrency: 4) }
    wait_for_workers(2)
    ok = Array.new(4) { |i| TaskerCore.create_task(name: "hang_once", context: { "n" => i }) }
    doomed = Array.new(2) { |i| TaskerCore.create_task(name: "hang_forever", context: { "n" => i }) }
    expect_finished_exactly_once(ok)
    expect_finished_exactly_once(doomed, state: "error")
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) AND name = 'after' " \
                     "AND state = 'pending'", ["{#{doomed.join(',')}}"]).first["n"].to_i).to eq(2)
  end

  it "loses nothing with a high-water mark of 1, where messages really are dropped" do
    use_templates(template("pair", [slow("a", sleep_ms: 5), slow("b", ["a"], sleep_ms: 5)]))
    # Batches of one step: a worker with 20 free slots is sent 20 messages at
    # once, and a queue of one refuses most of them.
    start_loop(send_hwm: 1, recv_hwm: 1, lease_ms: 300, batch_size: 1)
    config = fault_config("send_hwm" => 1, "recv_hwm" => 1)
    3.times { spawn_worker(config: config, concurrency: 20) }
    wait_for_workers(3)
    ids = Array.new(300) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    expect_finished_exactly_once(ids)
    stats = @handle.stats
    refused = stats[:send_refused] + stats[:batch_socket][:send_dropped]
    lost = stats["loop"]["timed_out"] + stats["loop"]["redispatched"] + refused
    expect(lost).to be > 0 # something really was refused or lost and made up for
  end

  it "loses nothing while 10 workers join and leave during a run" do
    use_templates(template("pair", [slow("a", sleep_ms: 50), slow("b", ["a"], sleep_ms: 50)]))
    start_loop
    first = spawn_worker
    wait_for_workers(1)
    ids = Array.new(200) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    joined = Array.new(10) { spawn_worker }
    wait_until(timeout: 60, message: "most of the 10 new workers live") { @handle.workers.size >= 8 }
    joined.each_with_index do |pid, i|
      if i.even?
        Process.kill("TERM", pid) # a clean leave: drains, says goodbye
      else
        kill9(pid)
        @spawned_pids.delete(pid)
      end
    end
    expect(Process.kill(0, first)).to eq(1)
    expect_finished_exactly_once(ids)
  end
end
