# frozen_string_literal: true

require "tmpdir"
require "yaml"

# Queues with real processes: routing by the queues workers advertise, a
# rolling deploy where an old worker lacks a new handler, and concurrency
# limits held by two orchestrators on one database (checked from the step
# transition history).
RSpec.describe "queues, routing and concurrency limits", :db, :no_valgrind do
  QUEUE_HANDLERS = File.expand_path("../fixtures/queue_handlers.rb", __dir__)

  let(:conn) { connect }

  after { cleanup_durable }

  def start_handle(**opts)
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*",
                                                  result_endpoint: "tcp://127.0.0.1:*", heartbeat_timeout_ms: 1500)
    @handle.start_orchestration(database_url: db_url, lease_ms: 5000, poll_interval_ms: 20, **opts)
    @handle.zeromq_config
  end

  def worker(cfg, **opts) = spawn_durable_worker(cfg["batch_endpoint"], cfg["result_endpoint"], **opts)

  def wait_workers(count)
    wait_until(timeout: 30, message: "#{count} live workers") { @handle.workers.size == count }
  end

  def echo(name, deps = [], **extra) = step(name, deps, handler: "DurableHandlers::Echo", **extra)

  def step_outputs(id) = TaskerCore.task(id)[:steps].to_h { |s| [s[:name], s] }

  def queue_row(name)
    TaskerCore::Store.with_connection do |c|
      TaskerCore::Queues.summary(c, heartbeat_timeout_ms: 5000).find { |q| q["queue"] == name }
    end
  end

  it "sends each step only to a worker serving its queue; a queue without a worker waits, visibly" do
    use_templates(template("routed", [echo("a", queue: "alpha"), echo("b", ["a"], queue: "beta"), echo("c", ["b"])]))
    cfg = start_handle
    alpha = worker(cfg, queues: "alpha,default")
    wait_workers(1)
    expect(@handle.workers.first["queues"]).to eq(%w[alpha default])
    ids = Array.new(4) { |i| TaskerCore.create_task(name: "routed", context: { "n" => i }) }

    # beta has no worker: its steps wait, ready, and the summary says so.
    wait_until(timeout: 30, message: "every b ready, waiting for a beta worker") do
      (row = queue_row("beta")) && row["ready"] == 4
    end
    expect(queue_row("beta")).to include("workers" => 0, "in_flight" => 0, "unserved" => true)
    expect(ids.map { |id| step_outputs(id)["b"][:state] }).to all(eq("pending"))
    expect(ids.map { |id| step_outputs(id)["b"][:attempts] }).to all(eq(0))

    beta = worker(cfg, queues: "beta")
    wait_for_tasks(conn, ids)
    ids.each do |id|
      s = step_outputs(id)
      expect([s["a"][:output]["pid"], s["b"][:output]["pid"], s["c"][:output]["pid"]]).to eq([alpha, beta, alpha])
    end
    expect(@handle.workers.map { |w| w["queues"] }).to contain_exactly(%w[alpha default], %w[beta])
    wait_until(timeout: 10, message: "tasker_workers has the queues") do
      conn.exec("SELECT queues FROM tasker_workers WHERE connected ORDER BY queues").map { |r| r["queues"] } ==
        [%w[alpha default], %w[beta]]
    end
  end

  it "runs the Python example worker on its own queue beside a Ruby worker" do
    python = ["/usr/bin/python3", "python3"].find do |candidate|
      system(candidate, "-c", "import zmq, msgpack", out: File::NULL, err: File::NULL)
    end
    skip "no python3 with pyzmq and msgpack" unless python
    use_templates(template("mixed", [echo("a"), step("py", ["a"], handler: "Python::Echo", queue: "py"),
                                     echo("c", ["py"])]))
    cfg = start_handle
    ruby = worker(cfg)
    py = Process.spawn(python, File.join(SpecHelpers::ROOT, "examples", "python_worker", "worker.py"),
                       "--batch-endpoint", cfg["batch_endpoint"], "--result-endpoint", cfg["result_endpoint"],
                       "--queues", "py", "--heartbeat-interval-ms", "200", err: File::NULL, pgroup: true)
    (@spawned_pids ||= []) << py
    wait_workers(2)
    ids = Array.new(5) { |i| TaskerCore.create_task(name: "mixed", context: { "n" => i }) }
    wait_for_tasks(conn, ids)
    ids.each do |id|
      s = step_outputs(id)
      expect(s["py"][:output]).to include("language" => "python", "echo" => { "n" => s["a"][:output]["n"] })
      expect([s["a"][:output]["pid"], s["c"][:output]["pid"]]).to eq([ruby, ruby])
    end
  end

  it "in a rolling deploy an old worker lacking a new handler refuses it and a new worker runs it: none fails" do
    use_templates(template("deploy", [echo("old"), step("added", ["old"], handler: "QueueHandlers::Added",
                                                                          handler_config: { "sleep_ms" => 20 })]))
    cfg = start_handle
    old = worker(cfg, concurrency: 20)
    wait_workers(1)
    ids = Array.new(30) { |i| TaskerCore.create_task(name: "deploy", context: { "n" => i }) }
    # Only the old worker for a while: it refuses every "added" step, none fails.
    wait_until(timeout: 30, message: "the old worker refused an added step") do
      @handle.stats["loop"]["handed_back_unknown_handler"].positive?
    end
    fresh = worker(cfg, handlers: [DurableHelpers::DURABLE_HANDLERS, QUEUE_HANDLERS])
    wait_for_tasks(conn, ids, timeout: 90)

    added = ids.map { |id| step_outputs(id)["added"] }
    expect(added.map { |s| s[:output]["pid"] }).to all(eq(fresh))
    expect(added.map { |s| [s[:failures], s[:lost_attempts]] }).to all(eq([0, 0]))
    expect(ids.map { |id| step_outputs(id)["old"][:output]["pid"] }).to all(eq(old))
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE to_state = 'error'")
               .first["n"]).to eq(0)
    # Each added step was refused by the old worker at most once: it was
    # not sent that handler again once it had refused it.
    expect(@handle.stats["loop"]["handed_back_unknown_handler"]).to be_between(1, 30)
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE reason = 'unknown_handler'")
               .first["n"]).to be_positive
    expect(steps_completed_twice(conn)).to be_empty
  end

  # The most steps in flight at once per group, from the transition
  # history in id order (a claim's rows are inserted after it counted, under
  # the lock, so ids order claims after the results they saw).
  def max_in_flight(conn, group_sql)
    conn.exec(<<~SQL).to_h { |r| [r["g"], r["peak"]] }
      WITH ev AS (
        SELECT #{group_sql} AS g, t.id,
               CASE WHEN t.reason = 'claimed' THEN 1 WHEN t.from_state = 'in_progress' THEN -1 ELSE 0 END AS d
          FROM tasker_workflow_step_transitions t JOIN tasker_workflow_steps s ON s.id = t.step_id
      )
      SELECT g, max(run)::int AS peak
        FROM (SELECT g, sum(d) OVER (PARTITION BY g ORDER BY id) AS run FROM ev) x
       GROUP BY g
    SQL
  end

  it "holds a per-key limit of 1 and a per-queue limit across two orchestrators on one database" do
    dir = Dir.mktmpdir("tasker_queues")
    (@tmp_dirs ||= []) << dir
    config = File.join(dir, "tasker-config.yml")
    File.write(config, { "default" => { "queues" => { "api" => { "concurrency" => 3 } },
                                        "logging" => { "level" => "error" } } }.to_yaml)
    use_templates(
      template("keyed", [step("call", handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 50 })],
               concurrency: { key: "customer-%{context.customer}", limit: 1 }),
      template("api", [step("call", handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => 30 })],
               queue: "api")
    )
    orchestrators = Array.new(2) do
      ports = Array.new(2) { free_port }
      endpoints = ports.map { |p| "tcp://127.0.0.1:#{p}" }
      spawn_orchestrator(db_url, *endpoints, lease_ms: 5000, env: { "TASKER_CONFIG_PATH" => config })
      endpoints
    end
    workers = orchestrators.map do |b, r|
      Array.new(2) { spawn_durable_worker(b, r, concurrency: 10, queues: "default,api") }
    end
    wait_until(timeout: 30, message: "two workers live on each orchestrator") do
      conn.exec("SELECT owner, count(*) AS n FROM tasker_workers WHERE connected GROUP BY owner")
          .map { |r| r["n"] } == [2, 2]
    end
    # Both orchestrators claim, by turns: an orchestrator whose step ends
    # claims the room it frees before the other wakes, so left alone one
    # of them can take every step. Its workers paused (capacity 0), an
    # orchestrator claims nothing, and still applies what it sent.
    capacity = lambda do |pids|
      conn.exec("SELECT sum(capacity)::int AS c FROM tasker_workers WHERE connected AND pid = ANY ($1::int[])",
                ["{#{pids.join(',')}}"]).first["c"].to_i
    end
    owners = -> { conn.exec("SELECT count(DISTINCT owner)::int AS n FROM tasker_workflow_step_transitions WHERE reason = 'claimed'").first["n"] }
    workers[0].each { |pid| Process.kill("TSTP", pid) }
    wait_until(timeout: 30, message: "the first orchestrator's workers paused") { capacity.(workers[0]).zero? }
    ids = TaskerCore.create_tasks(Array.new(40) { |i| { name: "keyed", context: { "customer" => i % 3 } } } +
                                  Array.new(30) { { name: "api" } })
    wait_until(timeout: 30, message: "the second orchestrator's first claims") { owners.call == 1 }
    workers[1].each { |pid| Process.kill("TSTP", pid) }
    workers[0].each { |pid| Process.kill("CONT", pid) }
    wait_until(timeout: 30, message: "the first orchestrator's first claims") { owners.call == 2 }
    workers[1].each { |pid| Process.kill("CONT", pid) }
    wait_for_tasks(conn, ids, timeout: 120)

    by_key = max_in_flight(conn, "s.concurrency_key")
    expect(by_key.values_at("customer-0", "customer-1", "customer-2")).to eq([1, 1, 1])
    by_queue = max_in_flight(conn, "s.queue")
    expect(by_queue["api"]).to be_between(1, 3)
    expect(owners.call).to eq(2) # both orchestrators claimed
    expect(steps_completed_twice(conn)).to be_empty
  end
end
