# frozen_string_literal: true

# The native orchestration loop with an in-process protocol peer as the
# worker (no child processes, so it runs under valgrind too).
RSpec.describe "TaskerCore::OrchestrationHandle orchestration loop", :db do
  let(:conn) { connect }

  before do
    use_templates(template("pair", [step("a"), step("b", ["a"])]))
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*",
                                                  result_endpoint: "tcp://127.0.0.1:*", heartbeat_timeout_ms: 2000)
  end

  after do
    @peer&.close
    @handle.stop_orchestration
    @handle.close
  end

  def start = @handle.start_orchestration(database_url: db_url, lease_ms: 60_000, poll_interval_ms: 20)

  def connect_peer(capacity: 4)
    cfg = @handle.zeromq_config
    @peer = WorkerPeer.new(id: "peer-1", batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"],
                           capacity: capacity)
    wait_until(timeout: 10, message: "the orchestrator's subscription") { @peer.orchestrator_seen?(timeout_ms: 20) }
    wait_until(timeout: 10, message: "the peer live") do
      @peer.heartbeat
      @handle.workers.size == 1
    end
  end

  def next_batch
    batch = nil
    wait_until(timeout: 10, message: "a batch") { batch = @peer.receive_batches(timeout_ms: 20).first }
    batch
  end

  it "starts and stops, owning the sockets while it runs" do
    expect(@handle.orchestrating?).to be(false)
    expect(start).to be(@handle)
    expect(@handle.orchestrating?).to be(true)
    expect { @handle.publish_batch({ "steps" => [{ "step_id" => 1, "task_id" => 1, "attempt" => 1 }] }) }
      .to raise_error(TaskerCore::Error, /orchestration loop owns the sockets/)
    expect { @handle.receive_results }.to raise_error(TaskerCore::Error, /orchestration loop owns the sockets/)
    expect { start }.to raise_error(TaskerCore::Error, /already running/)
    # #workers and #stats are snapshots readable from any thread
    expect(Thread.new { [@handle.workers, @handle.stats["loop"]["running"]] }.value).to eq([[], true])
    wait_until(message: "an iteration") { @handle.stats["loop"]["loop_iterations"] > 0 }
    expect(@handle.stop_orchestration(timeout_ms: 5000)).to be(true)
    expect(@handle.orchestrating?).to be(false)
    expect(@handle.receive_results).to eq([]) # the sockets are ours again
    expect(@handle.stats["loop"]).to include("running" => false, "db_connected" => false)
  end

  it "claims, dispatches and applies results, advancing the DAG" do
    id = TaskerCore.create_task(name: "pair", context: { "k" => "v" })
    start
    connect_peer
    batch = next_batch
    expect(batch).to include("type" => "batch", "worker_id" => "peer-1", "protocol_version" => 1)
    a = batch["steps"].first
    expect(a).to include("step_name" => "a", "attempt" => 1, "context" => { "k" => "v" }, "dependency_results" => {},
                         "handler" => "SpecHandlers::Noop")
    # marked dispatched right after the send (the claim committed before it)
    wait_until(message: "a in progress") { TaskerCore.task(id)[:steps].first[:state] == "in_progress" }
    @peer.partial(batch, a, output: { "from" => "a" })
    @peer.completion(batch)
    b = next_batch["steps"].first
    expect(b).to include("step_name" => "b", "dependency_results" => { "a" => { "from" => "a" } })
    @peer.partial(@peer.batches.last, b, output: { "from" => "b" })
    wait_until(message: "the task complete") { TaskerCore.task(id)[:status] == "complete" }
    # a duplicate of an applied result changes nothing and is counted (by
    # the handle core, which no longer hands it to the loop)
    @peer.partial(batch, a, output: { "from" => "again" })
    wait_until(message: "a duplicate result") { @handle.stats[:bad_messages][:duplicate_result] == 1 }
    expect(TaskerCore.task(id)[:steps].first[:output]).to eq("from" => "a")
    expect(@handle.stats["loop"]).to include("claimed" => 2, "dispatched" => 2, "completed" => 2, "stale_results" => 0)
  end

  it "counts bad results by reason and keeps running" do
    start
    connect_peer
    @peer.send_message("partial_result", "worker_id" => "peer-1", "status" => "complete")
    @peer.send_message("partial_result", "worker_id" => "peer-1", "step_id" => 1, "attempt" => 1, "status" => "odd")
    # the handle core refuses both with the loop's parser (protocol.c): the loop never sees them
    wait_until(message: "two bad results") { @handle.stats[:bad_messages][:invalid_fields] == 2 }
    expect(@handle.stats["loop"]["bad_results"]).to eq(0)
    expect(@handle.orchestrating?).to be(true)
  end

  it "releases the in-flight steps of a worker that says goodbye" do
    id = TaskerCore.create_task(name: "pair")
    start
    connect_peer
    next_batch
    @peer.goodbye
    wait_until(message: "the step released") { @handle.stats["loop"]["redispatched"] == 1 }
    step = conn.exec("SELECT state, attempts FROM tasker_workflow_steps WHERE task_id = $1 AND name = 'a'", [id]).first
    expect(step).to eq("state" => "pending", "attempts" => 1)
  end

  it "upserts the workers it sees into tasker_workers" do
    start
    connect_peer(capacity: 7)
    wait_until(timeout: 10, message: "the workers row") do
      conn.exec("SELECT capacity, connected FROM tasker_workers WHERE id = 'peer-1'").first ==
        { "capacity" => 7, "connected" => true }
    end
  end

  it "raises StoreError for a database it cannot reach, and stays stopped" do
    expect { @handle.start_orchestration(database_url: "postgresql://nobody@127.0.0.1:1/none") }
      .to raise_error(TaskerCore::StoreError, /127\.0\.0\.1/)
    expect(@handle.orchestrating?).to be(false)
  end

  describe TaskerCore::Internal::OrchestrationManager do
    it "refuses to start without a configured database" do
      saved = ENV.delete("DATABASE_URL")
      TaskerCore.reset_config!
      manager = described_class.send(:new)
      expect { manager.start_orchestration }.to raise_error(TaskerCore::ConfigurationError, /DATABASE_URL/)
      expect(manager.orchestrating?).to be(false)
    ensure
      ENV["DATABASE_URL"] = saved if saved
    end
  end
end
