# frozen_string_literal: true

require_relative "../fixtures/durable_handlers"

# Peers that could stop the work (issue 10, docs/protocol.md sections 3 and
# 5): a real orchestrator process, real worker processes and PostgreSQL.
# Each scenario ends with the exactly-once check and the liveness checks.
RSpec.describe "hostile peers", :db, :no_valgrind do
  let(:conn) { connect }

  after { cleanup_durable }

  def slow(name, deps = [], sleep_ms: 20)
    step(name, deps, handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => sleep_ms })
  end

  def connected_worker_ids
    conn.exec("SELECT id FROM tasker_workers WHERE connected ORDER BY id").map { |r| r["id"] }
  end

  it "a plain SUB subscribed to \"\" with RCVHWM 1 that never reads receives no batch and holds up no worker" do
    use_templates(template("pair", [slow("a"), slow("b", ["a"])]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    # A small send HWM: had the "" subscription been installed, its full
    # pipe would refuse every batch (NODROP) after a few.
    orch = spawn_orchestrator_process(batch_ep, result_ep, handle: { send_hwm: 10 })
    lurker = TaskerCore::Socket::Subscriber.new(connect: batch_ep, topics: [""], recv_hwm: 1)
    2.times { spawn_fault_worker(batch_ep, result_ep) }
    pad = "x" * 20_000 # 400 steps of 20 kB contexts: more than the kernel buffers hold
    ids = Array.new(200) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i, "pad" => pad }) }
    expect_finished_exactly_once(ids, timeout: 120)
    expect(lurker.receive_many(timeout_ms: 200)).to eq([])
    expect_live_after_fault(orch, template_name: "pair")
  ensure
    lurker&.close
  end

  it "applies no forged result (unknown worker id, or a live worker's id with the wrong batch), and a forged goodbye cuts no worker off" do
    use_templates(template("pair", [slow("a", sleep_ms: 100), slow("b", ["a"], sleep_ms: 100)]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep)
    2.times { spawn_fault_worker(batch_ep, result_ep) }
    wait_until(timeout: 30, message: "2 connected workers") { connected_worker_ids.size == 2 }
    workers = connected_worker_ids
    forger = TaskerCore::Socket::Publisher.new(connect: result_ep, send_hwm: 0)
    wait_until(message: "the orchestrator's subscription at the forger") { forger.subscriptions(timeout_ms: 10).any? }

    ids = Array.new(100) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }
    forged = 0
    until task_states(conn, ids)["complete"].to_i == ids.size
      # Perfectly formed results for the steps in flight right now.
      conn.exec("SELECT id, task_id, attempts FROM tasker_workflow_steps WHERE state IN ('enqueued', 'in_progress') LIMIT 50")
          .each do |r|
        ["intruder", workers.sample].each do |wid|
          msg = TaskerCore::Protocol.partial_result(batch_id: "forged-batch", worker_id: wid, step_id: r["id"].to_i,
                                                   task_id: r["task_id"].to_i, attempt: r["attempts"].to_i,
                                                   started_at: Time.now, finished_at: Time.now, output: { "forged" => wid })
          forger.send_parts(TaskerCore::Protocol.encode(msg))
          forged += 1
        end
      end
      TaskerCore::Socket.select([], 10)
    end
    expect(forged).to be > 0
    rows = expect_finished_exactly_once(ids)
    outputs = conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE id = ANY($1::bigint[]) AND output IS NOT NULL " \
                        "AND position('forged'::bytea in output) > 0", ["{#{rows.map { |r| r['id'] }.join(',')}}"])
    expect(outputs.first["n"].to_i).to eq(0)
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE id = ANY($1::bigint[]) AND output IS NULL",
                     ["{#{rows.map { |r| r['id'] }.join(',')}}"]).first["n"].to_i).to eq(0)

    # Forged goodbyes in the name of every live worker, while work runs.
    after_goodbye = Time.now
    later = Array.new(40) { |i| TaskerCore.create_task(name: "pair", context: { "later" => i }) }
    3.times do
      workers.each { |wid| forger.send_parts(TaskerCore::Protocol.encode(TaskerCore::Protocol.goodbye(worker_id: wid, reason: "forged"))) }
      TaskerCore::Socket.select([], 100)
    end
    expect_finished_exactly_once(later)
    # Both workers show live again: connected, with heartbeats after the goodbyes.
    wait_until(timeout: 30, message: "both workers live again") do
      conn.exec("SELECT count(*) AS n FROM tasker_workers WHERE id = ANY($1::text[]) AND connected AND last_heartbeat_at > to_timestamp($2)",
                ["{#{workers.join(',')}}", (after_goodbye.to_f + 0.5).to_s]).first["n"].to_i == 2
    end
    expect_live_after_fault(orch, template_name: "pair")
  ensure
    forger&.close
  end
end
