# frozen_string_literal: true

require "json"
require "open3"
require_relative "../fixtures/durable_handlers"

# The native orchestration loop against a real PostgreSQL and real worker
# processes (exe/tasker-worker): DAG shapes, retries, failures, timeouts,
# lost workers, a crashed orchestrator, two orchestrators, a database restart.
RSpec.describe "durable orchestration", :db, :no_valgrind do
  let(:conn) { connect }

  after do
    if @handle && !@handle.closed?
      @handle.stop_orchestration
      @handle.close
    end
    cleanup_durable
  end

  def start_loop(workers: 2, concurrency: 10, lease_ms: 1000)
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*",
                                                  result_endpoint: "tcp://127.0.0.1:*", heartbeat_timeout_ms: 1500)
    @handle.start_orchestration(database_url: db_url, lease_ms: lease_ms, poll_interval_ms: 20)
    cfg = @handle.zeromq_config
    pids = Array.new(workers) { spawn_durable_worker(cfg["batch_endpoint"], cfg["result_endpoint"], concurrency: concurrency) }
    wait_until(timeout: 30, message: "#{workers} live workers") { @handle.workers.size == workers }
    pids
  end

  def echo(name, deps = [], **extra) = step(name, deps, handler: "DurableHandlers::Echo", **extra)

  def outputs(task_id)
    TaskerCore.task(task_id)[:steps].to_h { |s| [s[:name], s[:output]] }
  end

  it "runs linear, diamond and fan-out/fan-in DAGs and passes dependency outputs to dependents" do
    use_templates(
      template("linear", [echo("a"), echo("b", ["a"]), echo("c", ["b"])]),
      template("diamond", [echo("top"), echo("left", ["top"]), echo("right", ["top"]), echo("bottom", %w[left right])]),
      template("fan", [echo("start"), *Array.new(50) { |i| echo("w#{i}", ["start"]) },
                       echo("join", Array.new(50) { |i| "w#{i}" })])
    )
    start_loop
    ids = { linear: TaskerCore.create_task(name: "linear", context: { "n" => 1 }),
            diamond: TaskerCore.create_task(name: "diamond", context: { "n" => 2 }),
            fan: TaskerCore.create_task(name: "fan", context: { "n" => 3 }) }
    wait_for_tasks(conn, ids.values)

    linear = outputs(ids[:linear])
    expect(linear["c"]["deps"]).to eq("b" => linear["b"])
    expect(linear["b"]["deps"]).to eq("a" => linear["a"])
    diamond = outputs(ids[:diamond])
    expect(diamond["bottom"]["deps"]).to eq("left" => diamond["left"], "right" => diamond["right"])
    expect(diamond["left"]["deps"]["top"]).to include("name" => "top", "n" => 2)
    fan = outputs(ids[:fan])
    expect(fan["join"]["deps"].keys).to match_array(Array.new(50) { |i| "w#{i}" })
    expect(fan["join"]["deps"]["w7"]).to include("name" => "w7", "n" => 3)
    # A dependent never starts before its parents finished (transition order).
    order = conn.exec(<<~SQL, [ids[:fan]]).map { |r| r["name"] }
      SELECT s.name FROM tasker_workflow_step_transitions t JOIN tasker_workflow_steps s ON s.id = t.step_id
       WHERE t.task_id = $1 AND t.reason = 'claimed' ORDER BY t.id
    SQL
    expect(order.first).to eq("start")
    expect(order.last).to eq("join")

    stats = @handle.stats["loop"]
    expect(stats).to include("claimed" => 59, "dispatched" => 59, "completed" => 59, "stale_results" => 0,
                             "db_connected" => true, "running" => true)
    expect(stats["loop_iterations"]).to be > 0
    expect(stats["apply_calls"]).to be <= stats["loop_iterations"]
    expect(stats["apply_calls"]).to be < 59 # results are written in batches, not one round trip per step
    expect(steps_completed_twice(conn)).to be_empty
  end

  it "records each worker's socket connection history in tasker_workers for tasker status" do
    start_loop(workers: 1)
    row = nil
    wait_until(timeout: 30, message: "the worker's connection history upserted") do
      row = conn.exec(<<~SQL).first
        SELECT connects, disconnects, last_connection_event, last_connection_event_at IS NOT NULL AS at_known
          FROM tasker_workers WHERE connected
      SQL
      row && row["connects"] >= 1
    end
    # Both sockets connected once; nothing dropped yet.
    expect(row).to include("disconnects" => 0, "last_connection_event" => "connected", "at_known" => true)
    expect(row["connects"]).to be_between(1, 2)

    out, err, st = Open3.capture3({ "DATABASE_URL" => db_url, "TASKER_ENV" => "test" }, RbConfig.ruby, "-I",
                                  File.join(SpecHelpers::ROOT, "lib"), File.join(SpecHelpers::ROOT, "exe", "tasker"),
                                  "status", "--json")
    expect(st.exitstatus).to eq(0), err
    worker = JSON.parse(out)["workers"].first
    expect(worker["connects"]).to be >= 1
    expect(worker).to include("disconnects" => 0, "last_connection_event" => "connected")
    expect(worker["last_connection_event_at"]).to match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/)
  end

  it "runs 1,000 tasks with 2 worker processes" do
    use_templates(template("pair", [echo("a"), echo("b", ["a"])]))
    ids = Array.new(1000) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    start_loop(concurrency: 50)
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC) # workers live: measure dispatch to completion
    wait_for_tasks(conn, ids, timeout: 90)
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    stats = @handle.stats["loop"]
    warn format("\n  1,000 tasks / 2,000 steps in %.2f s: %d steps/s, %d claims, %d applies, loop p50 %d us p99 %d us",
                elapsed, 2000 / elapsed, stats["claim_calls"], stats["apply_calls"],
                stats["loop_latency_us_p50"], stats["loop_latency_us_p99"])
    expect(stats["completed"]).to eq(2000)
    sample = ids.each_slice(25).map { |slice| outputs(slice.last) } # spread over the run
    expect(sample.map { |o| o["b"]["deps"]["a"] }).to eq(sample.map { |o| o["a"] })
    expect(sample.flat_map { |o| [o["a"]["pid"], o["b"]["pid"]] }.uniq.size).to eq(2) # both workers took work
    expect(steps_completed_twice(conn)).to be_empty
  end

  it "retries with the handler's retry_after, fails a task on a permanent error, and counts a timeout as a failed attempt" do
    use_templates(
      template("flaky", [step("f", [], handler: "DurableHandlers::Flaky", handler_config: { "retry_after" => 0.3 },
                              retry: { "max_attempts" => 5 })]),
      template("doomed", [step("p", [], handler: "DurableHandlers::Permanent"), echo("after", ["p"])]),
      template("slow", [step("h", [], handler: "DurableHandlers::HangOnce", timeout_ms: 300,
                              retry: { "max_attempts" => 3, "backoff_base_ms" => 50 })])
    )
    start_loop
    flaky = TaskerCore.create_task(name: "flaky")
    doomed = TaskerCore.create_task(name: "doomed")
    slow = TaskerCore.create_task(name: "slow")
    wait_for_tasks(conn, [flaky, slow])
    wait_for_tasks(conn, [doomed], state: "error")

    f = TaskerCore.task(flaky)[:steps].first
    expect(f).to include(state: "complete", attempts: 3, output: { "attempt" => 3 })
    times = conn.exec(<<~SQL, [flaky]).map { |r| [r["to_state"], r["created_at"]] }
      SELECT CASE WHEN reason = 'claimed' THEN 'claimed' ELSE to_state END AS to_state,
             extract(epoch FROM created_at)::float8 AS created_at FROM tasker_workflow_step_transitions
       WHERE task_id = $1 AND (reason = 'claimed' OR (to_state = 'pending' AND reason <> 'created')) ORDER BY id
    SQL
    # retry -> claim gaps honour retry_after (0.3 s)
    gaps = times.each_cons(2).select { |(a, _), (b, _)| a == "pending" && b == "claimed" }.map { |(_, t1), (_, t2)| t2 - t1 }
    expect(gaps.size).to eq(2)
    expect(gaps).to all(be >= 0.29)

    d = TaskerCore.task(doomed)[:steps].to_h { |s| [s[:name], s] }
    expect(d["p"]).to include(state: "error", attempts: 1)
    expect(d["after"]).to include(state: "pending", attempts: 0)

    h = TaskerCore.task(slow)[:steps].first
    expect(h).to include(state: "complete", attempts: 2, output: { "attempt" => 2 })
    expect(conn.exec("SELECT failures FROM tasker_workflow_steps WHERE task_id = $1", [slow]).first["failures"]).to eq(1)
    expect_counters("failed" => 4, "retried" => 3) { @handle.stats["loop"] }
  end

  it "re-dispatches the steps of a worker killed mid-batch and completes every task" do
    use_templates(template("slow", [step("s1", [], handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 300 }),
                                    step("s2", ["s1"], handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 300 })]))
    victim, = start_loop(concurrency: 5)
    ids = Array.new(20) { |i| TaskerCore.create_task(name: "slow", context: { "n" => i }) }
    victim_id = nil
    wait_until(timeout: 20, message: "the victim busy") do
      victim_id = @handle.workers.find { |w| w["pid"] == victim && w["in_flight"] > 0 }&.fetch("id")
    end
    kill9(victim)
    wait_for_tasks(conn, ids, timeout: 60)
    expect(@handle.stats["loop"]["redispatched"]).to be >= 1
    expect(@handle.workers.map { |w| w["id"] }).not_to include(victim_id)
    expect(steps_completed_twice(conn)).to be_empty
  end

  it "hands the steps a draining worker had not started to another worker: no attempt lost, none timed out" do
    use_templates(template("nap", [step("s", [], handler: "DurableHandlers::Nap", handler_config: { "sleep_ms" => 1000 })]))
    first, = start_loop(workers: 1, concurrency: 1)
    Process.kill(:TERM, first) # the default worker, gone; one that prefetches instead
    Process.wait(first)
    cfg = @handle.zeromq_config
    draining = spawn_durable_worker(cfg["batch_endpoint"], cfg["result_endpoint"], concurrency: 1, prefetch: 7)
    wait_until(timeout: 30, message: "the prefetching worker live") { @handle.workers.map { |w| w["pid"] } == [draining] }
    ids = Array.new(6) { |i| TaskerCore.create_task(name: "nap", context: { "n" => i }) }
    wait_until(timeout: 20, message: "all 6 steps on it") { @handle.workers.first["in_flight"] == 6 }

    Process.kill(:TERM, draining)
    Process.wait(draining)
    expect($?.exitstatus).to eq(0)
    other = spawn_durable_worker(cfg["batch_endpoint"], cfg["result_endpoint"], concurrency: 10)
    wait_for_tasks(conn, ids, timeout: 30)

    ran_on = ids.map { |id| TaskerCore.task(id)[:steps].first[:output]["pid"] }
    handed_back = ran_on.count(other)
    # it ran the step it had started (and, at most, one it started before the TERM landed); the rest ran on the other
    expect(ran_on.count(draining)).to be_between(1, 2)
    expect(ran_on - [draining, other]).to eq([])
    expect(handed_back).to be >= 4
    expect(steps_completed_twice(conn)).to be_empty
    steps = conn.exec("SELECT lost_attempts, failures FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])",
                      [ids]).to_a
    expect(steps).to all(eq("lost_attempts" => 0, "failures" => 0))
    reasons = conn.exec("SELECT reason FROM tasker_workflow_step_transitions WHERE task_id = ANY($1::bigint[])",
                        [ids]).map { |r| r["reason"] }
    expect(reasons.count("draining")).to eq(handed_back)
    expect(@handle.stats["loop"]).to include("handed_back_draining" => handed_back, "redispatched" => 0)
  end

  it "survives a PostgreSQL restart mid-run" do
    skip "needs the embedded cluster (DATABASE_URL is external)" unless DatabaseHelpers.pg_dir
    use_templates(template("chain", [echo("a"), echo("b", ["a"]), echo("c", ["b"])]))
    start_loop
    ids = Array.new(100) { |i| TaskerCore.create_task(name: "chain", context: { "n" => i }) }
    wait_until(timeout: 30, message: "some progress") { @handle.stats["loop"]["completed"] >= 20 }
    close_db_connections
    # Same port again: the cluster keeps its port file and the port was just freed.
    TaskerCore::EmbeddedPostgres.stop(dir: DatabaseHelpers.pg_dir)
    expect(TaskerCore::EmbeddedPostgres.start(dir: DatabaseHelpers.pg_dir, database: "tasker_test")).to eq(db_url)
    # The store pool's sessions died with the server; later examples need live ones.
    TaskerCore::Store.pool = TaskerCore::Store::Pool.new(url: db_url, size: 4, connect_timeout: 5)
    wait_until(timeout: 60, interval: 0.1, message: "a reconnect") { @handle.stats["loop"]["db_reconnects"] >= 1 }
    c = connect
    wait_for_tasks(c, ids, timeout: 60)
    expect(@handle.stats["loop"]["db_reconnects"]).to be >= 1
    expect(steps_completed_twice(c)).to be_empty
  end

  it "loses no result when the session writing results is terminated mid-run, three times" do
    use_templates(template("chain", [echo("a"), echo("b", ["a"]), echo("c", ["b"])]))
    start_loop
    # The loop writes results on a session of its own while it claims on
    # another: the one whose last statement applied results.
    results_session = <<~SQL
      SELECT pid FROM pg_stat_activity
       WHERE application_name = 'tasker_core' AND query LIKE 'SELECT applied, stale FROM tasker_apply_results%'
         AND pid <> pg_backend_pid()
    SQL
    ids = []
    3.times do |round|
      wave = Array.new(100) { |i| TaskerCore.create_task(name: "chain", context: { "round" => round, "n" => i }) }
      ids.concat(wave)
      pid = wait_until(timeout: 30, interval: 0.001, message: "a results session (round #{round + 1})") do
        conn.exec(results_session).first&.fetch("pid")
      end
      conn.exec("SELECT pg_terminate_backend($1)", [pid])
      wait_for_tasks(conn, wave, timeout: 60)
    end
    # the first two ended sessions are found by the next wave's results at the latest
    expect(@handle.stats["loop"]["db_errors"]).to be >= 2
    expect(steps_completed_twice(conn)).to be_empty
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) " \
                     "AND state = 'complete'", ["{#{ids.join(',')}}"]).first["n"]).to eq(ids.size * 3)
  end

  describe "orchestrator processes" do
    def endpoints = [tcp_endpoint, tcp_endpoint]

    it "completes every task after a kill -9 of the orchestrator and a restart, applying each output once" do
      use_templates(template("slow", [step("s1", [], handler: "DurableHandlers::Slow", timeout_ms: 1000,
                                           handler_config: { "sleep_ms" => 100 }, retry: { "max_attempts" => 5 }),
                                      step("s2", ["s1"], handler: "DurableHandlers::Slow", timeout_ms: 1000,
                                           handler_config: { "sleep_ms" => 100 }, retry: { "max_attempts" => 5 })]))
      batch_ep, result_ep = endpoints
      ids = Array.new(40) { |i| TaskerCore.create_task(name: "slow", context: { "n" => i }) }
      orch, = spawn_orchestrator(db_url, batch_ep, result_ep)
      2.times { spawn_durable_worker(batch_ep, result_ep, concurrency: 5) }
      wait_until(timeout: 30, message: "some steps complete") do
        conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE state = 'complete'").first["n"] >= 10
      end
      kill9(orch)
      unfinished = conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE state <> 'complete'").first["n"]
      expect(Integer(unfinished)).to be > 0 # the kill landed mid-run
      spawn_orchestrator(db_url, batch_ep, result_ep)
      wait_for_tasks(conn, ids, timeout: 60)
      expect(steps_completed_twice(conn)).to be_empty
      expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE to_state = 'complete'")
                 .first["n"]).to eq(80)
    end

    it "never dispatches a step attempt twice with two orchestrators on one database" do
      use_templates(template("chain", [echo("a"), echo("b", ["a"]), echo("c", ["b"])]))
      2.times do
        batch_ep, result_ep = endpoints
        spawn_orchestrator(db_url, batch_ep, result_ep, lease_ms: 5000)
        spawn_durable_worker(batch_ep, result_ep, concurrency: 10)
      end
      # Both orchestrators have a live worker before any work exists, so
      # both are polling for it when it arrives.
      wait_until(timeout: 30, message: "a live worker on each orchestrator") do
        conn.exec("SELECT count(DISTINCT owner) AS n FROM tasker_workers WHERE connected").first["n"] == 2
      end
      ids = Array.new(150) { |i| TaskerCore.create_task(name: "chain", context: { "n" => i }) }
      wait_for_tasks(conn, ids, timeout: 60)
      dup = conn.exec(<<~SQL).to_a
        SELECT step_id, attempt FROM tasker_workflow_step_transitions WHERE to_state IN ('enqueued', 'in_progress')
         GROUP BY step_id, attempt, to_state HAVING count(*) > 1
      SQL
      expect(dup).to be_empty
      expect(conn.exec("SELECT count(DISTINCT owner) AS n FROM tasker_workflow_step_transitions WHERE reason = 'claimed'")
                 .first["n"]).to eq(2)
      expect(steps_completed_twice(conn)).to be_empty
    end
  end
end
