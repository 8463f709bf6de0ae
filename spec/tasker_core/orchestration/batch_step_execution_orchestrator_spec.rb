# frozen_string_literal: true

RSpec.describe TaskerCore::Orchestration::BatchStepExecutionOrchestrator do
  include_context "a worker against a protocol peer"

  before do
    registry.register("Double", lambda { |task, sequence, step|
      { "value" => task.context["n"] * 2, "deps" => sequence.results, "dep_a" => sequence["a"],
        "config" => step.handler_config, "attempt" => step.attempt, "name" => step.name }
    })
    registry.register("Boom", ->(*) { raise ArgumentError, "boom" })
    registry.register("Busy", ->(*) { raise TaskerCore::RetryableError.new("busy", retry_after: 2.5) })
    registry.register("Never", ->(*) { raise TaskerCore::PermanentError, "never" })
    registry.register("NotHash", ->(*) { 42 })
    registry.register("Sleepy", ->(*) { sleep })
    registry.register("Opaque", ->(*) { { "x" => Object.new } })
  end

  # Step ids of the next n gated steps to start (fails rather than hangs).
  def started_steps(count)
    wait_until(message: "#{count} gated step(s) to start") { started.size >= count }
    Array.new(count) { started.pop }
  end

  # A worker whose results go to a bound subscriber with no subscription
  # yet (so its results wait), sent one batch of steps; the subscriber.
  def held_worker(batch_id, steps, max_workers:)
    results = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*", topics: [])
    @worker = described_class.new(step_sub_endpoint: peer.batch_endpoint, result_pub_endpoint: results.last_endpoint,
                                  max_workers: max_workers, handler_registry: registry, worker_id: worker_id,
                                  heartbeat_interval_ms: 50, logger: Logger.new(log)).start
    peer.wait_for("the worker's batch subscription") { peer.batch_subscriptions.any? }
    batch = TaskerCore::Protocol.batch(batch_id: batch_id, worker_id: worker_id, steps: steps)
    expect(peer.send_raw(TaskerCore::Protocol.encode(batch))).to be(true)
    results
  end

  def partial_for(batch_id, step_id)
    peer.partials(batch_id).find { |m| m["step_id"] == step_id }
  end

  it "gives each step it has a handler for exactly one correct partial, the batch one completion after them" do
    start_worker
    steps = [step(1, "Double", handler_config: { "k" => "v" }, attempt: 3, dependency_results: { "a" => { "x" => 1 } }),
             step(2, "Boom"), step(3, "Busy"), step(4, "Never"), step(5, "NotHash"), step(6, "Nope::Missing"),
             step(7, "Sleepy", timeout_ms: 100), step(8, "Opaque")]
    batch_id = peer.send_batch(worker_id, steps)
    peer.wait_for("the completion") { peer.completions(batch_id).any? }

    partials = peer.partials(batch_id)
    expect(partials.map { |m| m["step_id"] }).to match_array([1, 2, 3, 4, 5, 7, 8])
    by_step = partials.to_h { |m| [m["step_id"], m] }

    expect(by_step[1]).to include("status" => "complete", "error" => nil, "task_id" => 101, "attempt" => 3,
                                  "worker_id" => worker_id)
    expect(by_step[1]["output"]).to eq("value" => 2, "deps" => { "a" => { "x" => 1 } }, "dep_a" => { "x" => 1 },
                                       "config" => { "k" => "v" }, "attempt" => 3, "name" => "s1")
    expect(by_step[2]["error"]).to include("class" => "ArgumentError", "message" => "boom", "retryable" => true)
    expect(by_step[2]["error"]["backtrace"]).not_to be_empty
    expect(by_step[3]["error"]).to include("class" => "TaskerCore::RetryableError", "retryable" => true, "retry_after" => 2.5)
    expect(by_step[4]["error"]).to include("class" => "TaskerCore::PermanentError", "retryable" => false)
    expect(by_step[5]["error"]).to include("class" => "TypeError", "retryable" => false)
    expect(by_step[5]["error"]["message"]).to include("Integer")
    # A handler this worker lacks: refused (unknown_handler) so another worker can take it, before any partial.
    refusal = peer.of_type("batch_refusal").find { |m| m["batch_id"] == batch_id }
    expect(refusal).to include("reason" => "unknown_handler")
    expect(refusal["steps"]).to match([a_hash_including("step_id" => 6, "attempt" => 1, "reason" => "unknown_handler",
                                                        "message" => /no handler Nope::Missing/)])
    expect(index_of(refusal)).to be < partials.map { |m| index_of(m) }.min
    expect(by_step[7]["error"]).to include("class" => "TaskerCore::StepTimeoutError", "retryable" => true)
    expect(by_step[8]["error"]).to include("class" => "TypeError", "retryable" => false)
    expect(by_step[8]["error"]["message"]).to include("could not be encoded")
    [2, 3, 4, 5, 7, 8].each { |id| expect(by_step[id]).to include("status" => "error", "output" => nil) }

    completion = peer.completions(batch_id).first
    expect(completion["steps"]).to eq(steps.reject { |s| s[:step_id] == 6 }.map do |s|
      { "step_id" => s[:step_id], "attempt" => s[:attempt] || 1, "status" => s[:step_id] == 1 ? "complete" : "error" }
    end)
    expect(partials.map { |m| index_of(m) }.max).to be < index_of(completion)

    # Nothing more for this batch arrives later (the interrupted Sleepy step
    # does not produce a second partial).
    peer.wait_for("a later heartbeat") { |msgs| msgs.last["type"] == "heartbeat" && msgs.last["in_flight"].zero? }
    expect(peer.partials(batch_id).size).to eq(7)
    expect(peer.completions(batch_id).size).to eq(1)
    expect(@worker.stats).to include(batches_received: 1, steps_completed: 1, steps_failed: 6, steps_timed_out: 1,
                                     partials_sent: 7, completions_sent: 1, refusals_sent: 1,
                                     steps_refused: { unknown_handler: 1 })
  end

  it "streams a fast step's partial while a slow step of the same batch still runs" do
    start_worker
    batch_id = peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Double")])
    peer.wait_for("the fast step's partial") { partial_for(batch_id, 2) }
    expect(partial_for(batch_id, 1)).to be_nil
    expect(peer.completions(batch_id)).to be_empty

    gate << :go
    peer.wait_for("the completion") { peer.completions(batch_id).any? }
    expect(index_of(partial_for(batch_id, 2))).to be < index_of(partial_for(batch_id, 1))
    expect(index_of(partial_for(batch_id, 1))).to be < index_of(peer.completions(batch_id).first)
  end

  it "starts as many blocking steps at once as it has threads, and each queued one as a thread frees up" do
    start_worker(max_workers: 6)
    first = peer.send_batch(worker_id, (1..4).map { |id| step(id, "Gated") })
    expect(started_steps(4)).to match_array([1, 2, 3, 4])
    # Two threads still idle: a second batch's steps start on them while the
    # first four block, and the rest wait for a thread.
    second = peer.send_batch(worker_id, (5..9).map { |id| step(id, "Gated") })
    expect(started_steps(2)).to match_array([5, 6])
    expect(started.size).to eq(0) # all six threads are busy

    3.times { gate << :go }
    expect(started_steps(3)).to match_array([7, 8, 9])
    6.times { gate << :go }
    peer.wait_for("both completions") { peer.completions(first).any? && peer.completions(second).any? }
    expect(peer.partials(first).map { |m| m["step_id"] }).to match_array([1, 2, 3, 4])
    expect(peer.partials(second).map { |m| m["step_id"] }).to match_array([5, 6, 7, 8, 9])
    expect((peer.partials(first) + peer.partials(second)).map { |m| m["status"] }.uniq).to eq(["complete"])
    expect(@worker.stats).to include(steps_completed: 9, steps_failed: 0, late_results_discarded: 0)
  end

  it "completes an empty batch at once" do
    start_worker
    batch_id = peer.send_batch(worker_id, [])
    completion = peer.wait_for("the completion") { peer.completions(batch_id).first }
    expect(completion["steps"]).to eq([])
  end

  it "sends heartbeats carrying capacity and in-flight steps" do
    start_worker
    peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Gated")])
    busy = peer.wait_for("a heartbeat with 2 in flight") { peer.heartbeats.find { |h| h["in_flight"] == 2 } }
    expect(busy).to include("capacity" => 4, "worker_id" => worker_id, "pid" => Process.pid)
    2.times { gate << :go }
    peer.wait_for("a heartbeat with nothing in flight") { peer.heartbeats.last["in_flight"].zero? }
    expect(@worker.stats[:heartbeats_sent]).to be >= 2
  end

  it "takes prefetch steps beyond its threads: advertised in its capacity, queued, each run as a thread frees" do
    start_worker(max_workers: 1, prefetch: 2)
    expect(peer.wait_for("a heartbeat") { peer.heartbeats.last }).to include("capacity" => 3)
    batch_id = peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Gated"), step(3, "Gated")])
    expect(started_steps(1)).to eq([1])
    busy = peer.wait_for("a heartbeat with 3 in flight") { peer.heartbeats.find { |h| h["in_flight"] == 3 } }
    expect(busy["capacity"]).to eq(3)
    expect(started).to be_empty # one thread: the other two wait in the queue
    gate << :go
    expect(started_steps(1)).to eq([2])
    expect(started).to be_empty
    gate << :go
    expect(started_steps(1)).to eq([3])
    gate << :go
    peer.wait_for("the completion") { peer.completions(batch_id).any? }
    expect(peer.partials(batch_id).map { |m| [m["step_id"], m["status"]] })
      .to contain_exactly([1, "complete"], [2, "complete"], [3, "complete"])
  end

  it "advertises no capacity while paused and takes work again on resume" do
    start_worker
    @worker.pause
    peer.wait_for("a paused heartbeat") { peer.heartbeats.last["capacity"].zero? }
    @worker.resume
    peer.wait_for("a resumed heartbeat") { peer.heartbeats.last["capacity"] == 4 }
    batch_id = peer.send_batch(worker_id, [step(1, "Double")])
    expect(peer.wait_for("the completion") { peer.completions(batch_id).first }).to be_truthy
  end

  it "drains on #stop: finishes running steps, sends their results, then says goodbye" do
    start_worker
    batch_id = peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Double")])
    expect(started_steps(1)).to eq([1])
    stopper = Thread.new { @worker.stop(timeout: 30) }
    peer.wait_for("a draining heartbeat") { peer.heartbeats.last["capacity"].zero? }
    expect(peer.of_type("goodbye")).to be_empty

    gate << :go
    goodbye = peer.wait_for("goodbye") { peer.of_type("goodbye").first }
    expect(stopper.value).to be(true)
    expect(goodbye).to include("worker_id" => worker_id, "reason" => "shutdown")
    expect(partial_for(batch_id, 1)).to include("status" => "complete", "output" => { "released" => 1 })
    expect(index_of(peer.completions(batch_id).first)).to be < index_of(goodbye)
    expect(@worker.running?).to be(false)
  end

  it "reports steps still unfinished when the shutdown timeout runs out" do
    start_worker(max_workers: 1)
    batch_id = peer.send_batch(worker_id, [step(1, "Sleepy", timeout_ms: 600_000), step(2, "Double")])
    peer.wait_for("a heartbeat with the steps in flight") { peer.heartbeats.last["in_flight"] == 2 }
    stopper = Thread.new { @worker.stop(timeout: 0.2) }
    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    expect(stopper.value).to be(true)
    expect(partial_for(batch_id, 1)["error"]).to include("class" => "TaskerCore::StepTimeoutError", "retryable" => true)
    expect(partial_for(batch_id, 1)["error"]["message"]).to include("shut down")
    # queued behind it, never started: handed back (draining), no partial
    expect(partial_for(batch_id, 2)).to be_nil
    expect(peer.of_type("batch_refusal").first["steps"]).to match([a_hash_including("step_id" => 2, "reason" => "draining")])
    expect(peer.completions(batch_id).size).to eq(1)
  end

  it "hands back the steps it has not started when it drains, and refuses any batch that comes after" do
    start_worker(max_workers: 1, prefetch: 3)
    batch_id = peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Double"), step(3, "Double"), step(4, "Double")])
    expect(started_steps(1)).to eq([1])
    peer.wait_for("a heartbeat with 4 in flight") { peer.heartbeats.find { |h| h["in_flight"] == 4 } }
    stopper = Thread.new { @worker.stop(timeout: 30) }
    refusal = peer.wait_for("the draining refusal") { peer.of_type("batch_refusal").first }
    expect(refusal).to include("batch_id" => batch_id, "reason" => "draining", "worker_id" => worker_id)
    expect(refusal["steps"].map { |s| [s["step_id"], s["attempt"], s["reason"]] })
      .to eq([[2, 1, "draining"], [3, 1, "draining"], [4, 1, "draining"]])
    peer.wait_for("a draining heartbeat listing only the running step") do
      peer.heartbeats.find { |h| h["capacity"].zero? && h["in_flight_steps"] == [[1, 1]] }
    end

    # a batch sent before the orchestrator heard: refused whole, never run
    late = peer.send_batch(worker_id, [step(5, "Double")])
    late_refusal = peer.wait_for("the late batch's refusal") { peer.of_type("batch_refusal", batch_id: late).first }
    expect(late_refusal["steps"]).to match([a_hash_including("step_id" => 5, "reason" => "draining")])
    expect(peer.wait_for("its empty completion") { peer.completions(late).first }["steps"]).to eq([])

    gate << :go
    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    expect(stopper.value).to be(true)
    expect(peer.partials.map { |m| m["step_id"] }).to eq([1])
    completion = peer.completions(batch_id).first
    expect(completion["steps"]).to eq([{ "step_id" => 1, "attempt" => 1, "status" => "complete" }])
    expect(index_of(refusal)).to be < index_of(completion)
    expect(@worker.stats[:steps_refused]).to include(draining: 4)
  end

  it "replaces a thread whose handler ignores its timeout, keeping the pool at size" do
    stop_flag = false
    registry.register("Stubborn", lambda { |*|
      until stop_flag
        begin
          sleep 0.01
        rescue Exception # rubocop:disable Lint/RescueException
          nil # swallows the timeout interrupt on purpose
        end
      end
      { "late" => true }
    })
    start_worker(max_workers: 2, timeout_grace_s: 0.05)
    batch_id = peer.send_batch(worker_id, [step(1, "Stubborn", timeout_ms: 50)])
    timed_out = peer.wait_for("the timeout partial") { partial_for(batch_id, 1) }
    expect(timed_out["error"]["class"]).to eq("TaskerCore::StepTimeoutError")
    wait_until(message: "the stubborn thread to be abandoned") { @worker.stats[:threads_abandoned] == 1 }

    peer.send_batch(worker_id, [step(2, "Gated"), step(3, "Gated")])
    expect(started_steps(2)).to match_array([2, 3]) # two threads free: the pool kept its size
    2.times { gate << :go }
    stop_flag = true
    wait_until(message: "the late result to be discarded") { @worker.stats[:late_results_discarded] == 1 }
    expect(peer.partials(batch_id).size).to eq(1)
  end

  it "counts and logs bad input once per reason and keeps serving" do
    start_worker
    topic = TaskerCore::Protocol.batch_topic(worker_id)
    good = TaskerCore::Protocol.batch(batch_id: "x", worker_id: worker_id, steps: [])
    pack = ->(msg) { TaskerCore::Codec.pack(msg) }
    peer.send_raw([topic, "\xC1 not msgpack".b])
    peer.send_raw([topic, "\xC1 still not".b])
    peer.send_raw([topic, pack.call(good), "extra"])
    peer.send_raw([topic, pack.call(good.merge("protocol_version" => 3))])
    peer.send_raw([topic, pack.call(good.merge("type" => "launch"))])
    peer.send_raw([topic, pack.call(good.except("steps"))])
    peer.send_raw([topic, pack.call(good.merge("steps" => [{ "step_id" => 1 }]))])
    peer.send_raw([topic, pack.call(TaskerCore::Protocol.goodbye(worker_id: worker_id, reason: "?"))])

    batch_id = peer.send_batch(worker_id, [step(1, "Double")])
    peer.wait_for("the good batch's completion") { peer.completions(batch_id).any? }
    expect(@worker.stats[:bad_messages]).to eq(undecodable: 2, malformed_frames: 1, wrong_version: 1,
                                               unknown_type: 1, invalid_field: 2, topic_mismatch: 1)
    expect(log.string.scan("(undecodable)").size).to eq(1)
    expect(log.string).to include("(wrong_version)", "(unknown_type)", "missing field steps")
    expect(@worker.running?).to be(true)
    # The batch whose only step cannot be named (no attempt) runs nothing
    # and is completed empty; the orchestrator takes that step back when a
    # heartbeat reports the batch without it.
    expect(peer.completions.map { |c| [c["batch_id"], c["steps"]] })
      .to eq([["x", []], [batch_id, [{ "step_id" => 1, "attempt" => 1, "status" => "complete" }]]])
    # Bodies on this worker's topic that it could not read are answered;
    # other bad messages are not.
    refusals = peer.of_type("batch_refusal")
    expect(refusals.map { |r| [r["batch_id"], r["reason"], r["steps"]] })
      .to eq([[nil, "undecodable", []], [nil, "undecodable", []], ["x", "undecodable", []]])
    expect(refusals.last["message"]).to include("missing field steps")
  end

  it "sends results that finished together in one partial_results, each entry as its partial_result would be" do
    results = held_worker("together", (1..5).map { |i| step(i, "Double") } + [step(6, "Boom"), step(7, "Double")],
                          max_workers: 4)
    # No orchestrator subscribed yet: every result waits in the outbox.
    wait_until(message: "the steps to run") { @worker.stats[:steps_completed] + @worker.stats[:steps_failed] == 7 }
    expect(@worker.stats[:partials_sent]).to eq(0)

    got = release_held_results(results)
    together = got.select { |m| m["type"] == "partial_results" }
    expect(together.size).to eq(1)
    expect(got.none? { |m| m["type"] == "partial_result" }).to be(true)
    entries = together.first["results"]
    expect(entries.map { |e| e["step_id"] }).to match_array((1..7).to_a)
    expect(entries).to all(include("batch_id" => "together", "attempt" => 1))
    expect(entries.find { |e| e["step_id"] == 6 }).to include("status" => "error", "output" => nil,
                                                               "error" => include("class" => "ArgumentError"))
    expect(entries.find { |e| e["step_id"] == 2 }).to include("status" => "complete", "error" => nil)
    expect(together.first).to include("protocol_version" => 2, "worker_id" => worker_id)
    expect(got.index(together.first)).to be < got.index { |m| m["type"] == "batch_completion" }
    expect(@worker.stats).to include(partials_sent: 7, partial_results_sent: 1, completions_sent: 1)
  ensure
    @worker&.stop(timeout: 1)
    @worker = nil
    results&.close
  end

  it "refuses an output with a map key that is not a string (version 2) as a failed step" do
    registry.register("IntKeys", ->(*) { { "rows" => [{ 1 => "one" }] } })
    registry.register("SymKeys", ->(*) { { ok: true, nested: { a: 1 } } })
    start_worker
    batch_id = peer.send_batch(worker_id, [step(1, "IntKeys"), step(2, "SymKeys")])
    peer.wait_for("the completion") { peer.completions(batch_id).any? }
    int_keys = partial_for(batch_id, 1)
    expect(int_keys).to include("status" => "error", "output" => nil)
    expect(int_keys["error"]).to include("class" => "TypeError", "retryable" => false)
    expect(int_keys["error"]["message"]).to include("output.rows[0].1", "not a string")
    expect(partial_for(batch_id, 2)).to include("status" => "complete", "output" => { "ok" => true, "nested" => { "a" => 1 } })
  end

  it "sets ZMQ_IMMEDIATE on its result socket" do
    pub = TaskerCore::Socket::Publisher.new(connect: peer.result_endpoint, immediate: true)
    plain = TaskerCore::Socket::Publisher.new(connect: peer.result_endpoint)
    expect([pub.immediate?, plain.immediate?]).to eq([true, false])
    settings = TaskerCore::Worker::Settings.build(worker_id: worker_id, curve: nil, step_sub_endpoint: peer.batch_endpoint,
                                                  result_pub_endpoint: peer.result_endpoint)
    conn = TaskerCore::Worker::Connection.new(settings: settings,
                                              stats: TaskerCore::Worker::Stats.new(logger: Logger.new(log), worker_id: worker_id),
                                              logger: Logger.new(log))
    conn.open
    expect(conn.instance_variable_get(:@pub).immediate?).to be(true)
  ensure
    conn&.close
    pub&.close
    plain&.close
  end

  it "holds results until the orchestrator subscribes, then sends them" do
    results = held_worker("held", [step(1, "Double")], max_workers: 2)
    wait_until(message: "the step to run") { @worker.stats[:steps_completed] == 1 }
    expect(@worker.stats[:partials_sent]).to eq(0)

    # The worker flushes what it held before its next heartbeat: read on
    # until both have come.
    types = release_held_results(results, until_types: %w[batch_completion heartbeat]).map { |m| m["type"] }
    expect(types).to include("heartbeat", "partial_result")
    expect(types.index("partial_result")).to be < types.index("batch_completion")
  ensure
    @worker&.stop(timeout: 1)
    @worker = nil
    results&.close
  end
end
