# frozen_string_literal: true

# The worker's side of the limits in docs/protocol.md (4.1, 4.5, 4.7, 6, 11):
# refusals instead of dropped batches, checked outputs, heartbeats the
# orchestrator can reconcile its credit from, and sockets that come back
# after libzmq drops their connection. The orchestrator here is a real peer
# made of libzmq sockets (spec/support/protocol_peer.rb).
RSpec.describe TaskerCore::Orchestration::BatchStepExecutionOrchestrator do
  include_context "a worker against a protocol peer"

  before do
    registry.register("Double", ->(task, *) { { "value" => task.context["n"] * 2 } })
    registry.register("Big", ->(_task, _seq, step) { { "blob" => "x" * step.handler_config["bytes"] } })
    registry.register("Deep", ->(_task, _seq, step) { { "d" => step.handler_config["levels"].times.reduce(1) { |v, _| [v] } } })
    registry.register("LongFailure", ->(*) { raise TaskerCore::RetryableError, "y" * 50_000 })
  end

  after { @other&.close }

  def nested(levels)
    (levels - 1).times.reduce({}) { |inner, _| { "k" => inner } }
  end

  def only(list)
    expect(list.size).to eq(1)
    list.first
  end

  def partial(batch_id, step_id)
    peer.partials(batch_id).find { |m| m["step_id"] == step_id }
  end

  describe "heartbeats" do
    it "advertise the worker's limits and list exactly the steps not yet reported" do
      start_worker(max_batch_steps: 7, max_message_bytes: 123_456, max_payload_depth: 9)
      hb = peer.heartbeats.last
      expect(hb).to include("limits" => { "max_batch_steps" => 7, "max_message_bytes" => 123_456, "max_payload_depth" => 9 },
                            "last_batch_id" => nil, "in_flight_steps" => [])

      b1 = peer.send_batch(worker_id, [step(1, "Gated"), step(2, "Gated", attempt: 2)])
      b2 = peer.send_batch(worker_id, [step(3, "Gated")])
      peer.wait_for("a heartbeat listing all three") { peer.heartbeats.last["in_flight_steps"].size == 3 }
      expect(peer.heartbeats.last).to include("last_batch_id" => b2, "in_flight" => 3)
      expect(peer.heartbeats.last["in_flight_steps"]).to contain_exactly([1, 1], [2, 2], [3, 1])

      3.times { gate << :go }
      peer.wait_for("both completions") { peer.completions(b1).any? && peer.completions(b2).any? }
      peer.wait_for("a heartbeat after the results") { index_of(peer.heartbeats.last) > index_of(peer.completions(b2).first) }

      # Every heartbeat, in arrival order, lists exactly the steps sent and
      # not yet answered by a partial that arrived before it.
      sent = [[1, 1], [2, 2], [3, 1]]
      answered = []
      peer.messages.each do |m|
        answered << [m["step_id"], m["attempt"]] if m["type"] == "partial_result"
        next unless m["type"] == "heartbeat" && m["last_batch_id"]

        expected = m["last_batch_id"] == b1 ? [[1, 1], [2, 2]] : sent
        expect(m["in_flight_steps"]).to match_array(expected - answered)
        expect(m["in_flight"]).to eq(m["in_flight_steps"].size)
      end
      expect(peer.heartbeats.last["in_flight_steps"]).to eq([])
    end
  end

  describe "messages over the orchestrator's result limit" do
    it "sends refusals in parts" do
      start_worker(max_result_bytes: 600, max_batch_steps: 1)
      batch_id = peer.send_batch(worker_id, (1..12).map { |i| step(i, "Double") })
      peer.wait_for("the completion") { peer.completions(batch_id).any? }
      refusals = peer.of_type("batch_refusal", batch_id: batch_id)
      expect(refusals.size).to be > 1
      expect(refusals.flat_map { |r| r["steps"].map { |s| s["step_id"] } }).to eq((2..12).to_a)
      expect(refusals.map { |r| TaskerCore::Codec.pack(r).bytesize }.max).to be <= 600
      expect(@worker.stats[:refusals_sent]).to eq(refusals.size)
    end

    it "sends heartbeats without their optional fields when they would not fit" do
      start_worker(max_result_bytes: 400)
      expect(peer.heartbeats.last).to include("in_flight_steps" => [], "limits" => a_kind_of(Hash))
      batch_id = peer.send_batch(worker_id, (1..100).map { |i| step(i, "Gated") })
      peer.wait_for("a heartbeat with 100 in flight") { peer.heartbeats.last["in_flight"] == 100 }
      crowded = peer.heartbeats.last
      expect(crowded.keys).not_to include("in_flight_steps", "last_batch_id")
      expect(crowded.keys).to include("connection")
      100.times { gate << :go }
      peer.wait_for("the completion") { peer.completions(batch_id).any? }
      peer.wait_for("a heartbeat with its list again") { peer.heartbeats.last["in_flight_steps"] == [] }
      expect(peer.heartbeats.map { |h| TaskerCore::Codec.pack(h).bytesize }.max).to be <= 400
      expect(log.string.scan("over the orchestrator's result limit of 400 bytes").size).to eq(1)
    end
  end

  describe "batch refusals" do
    it "runs the first max_batch_steps steps and refuses the rest as too_many_steps, before any partial" do
      start_worker(max_batch_steps: 2)
      batch_id = peer.send_batch(worker_id, (1..5).map { |i| step(i, "Double", attempt: i) })
      peer.wait_for("the completion") { peer.completions(batch_id).any? }
      refusal = only(peer.of_type("batch_refusal", batch_id: batch_id))
      expect(refusal).to include("worker_id" => worker_id, "reason" => "too_many_steps")
      expect(refusal["message"]).to include("max_batch_steps of 2")
      expect(refusal["steps"].map { |s| [s["step_id"], s["attempt"], s["reason"]] })
        .to eq([[3, 3, "too_many_steps"], [4, 4, "too_many_steps"], [5, 5, "too_many_steps"]])
      expect(peer.partials(batch_id).map { |m| m["step_id"] }).to contain_exactly(1, 2)
      expect(only(peer.completions(batch_id))["steps"].map { |s| s["step_id"] }).to eq([1, 2])
      expect(index_of(refusal)).to be < peer.partials(batch_id).map { |m| index_of(m) }.min
      expect(@worker.stats).to include(refusals_sent: 1, steps_refused: { too_many_steps: 3 })
    end

    it "refuses an invalid or too deep step alone and runs the others" do
      start_worker(max_payload_depth: 5)
      topic = TaskerCore::Protocol.batch_topic(worker_id)
      good = ->(id) { TaskerCore::Protocol.batch_step(**step(id, "Double")) }
      steps = [good.call(1), good.call(2).merge("handler" => ""), good.call(3).merge("context" => nested(6)),
               good.call(4).merge("dependency_results" => { "up" => nested(6) }), good.call(5).except("attempt"),
               good.call(6).merge("handler_config" => nested(5)), good.call(7)]
      msg = TaskerCore::Protocol.batch(batch_id: "mixed", worker_id: worker_id, steps: []).merge("steps" => steps)
      peer.send_raw([topic, TaskerCore::Codec.pack(msg)])

      peer.wait_for("the completion") { peer.completions("mixed").any? }
      refusal = only(peer.of_type("batch_refusal", batch_id: "mixed"))
      by_step = refusal["steps"].to_h { |s| [s["step_id"], s] }
      expect(by_step.keys).to contain_exactly(2, 3, 4) # step 5 has no attempt: it cannot be named
      expect(by_step[2]).to include("reason" => "invalid_step", "attempt" => 1)
      expect(by_step[2]["message"]).to include("steps[1].handler")
      expect(by_step[3]).to include("reason" => "too_deep")
      expect(by_step[3]["message"]).to include("context nests 6 levels, over max_payload_depth 5")
      expect(by_step[4]["message"]).to include("dependency up nests 6 levels")
      expect(peer.partials("mixed").map { |m| m["step_id"] }).to contain_exactly(1, 6, 7)
      expect(peer.partials("mixed").map { |m| m["status"] }.uniq).to eq(["complete"])
      expect(@worker.stats).to include(steps_refused: { invalid_step: 2, too_deep: 2 }, steps_refused_unnamed: 1)
      peer.wait_for("a heartbeat with nothing in flight") do
        peer.heartbeats.last["last_batch_id"] == "mixed" && peer.heartbeats.last["in_flight_steps"].empty?
      end
    end

    it "refuses a body it cannot decode, naming the batch when it can read the id" do
      start_worker
      topic = TaskerCore::Protocol.batch_topic(worker_id)
      pack = ->(v) { TaskerCore::Codec.pack(v) }
      too_deep = TaskerCore::Protocol.batch(batch_id: "deep-1", worker_id: worker_id, steps: [step(1, "Double")])
      too_deep["steps"][0]["context"] = nested(40)
      body = +"".b
      body << "\x86".b # the same map, packed by hand: the codec will not pack it that deep
      too_deep.except("steps").each { |k, v| body << pack.call(k) << pack.call(v) }
      body << pack.call("steps") << "\x91\x81".b << pack.call("context") << ("\x81\xA1k".b * 40) << "\x80".b
      peer.send_raw([topic, body])
      peer.send_raw([topic, "\xC1 not msgpack".b])

      peer.wait_for("two refusals") { peer.of_type("batch_refusal").size == 2 }
      named, anonymous = peer.of_type("batch_refusal")
      expect(named).to include("batch_id" => "deep-1", "reason" => "undecodable", "steps" => [])
      expect(named["message"]).to include("deep-1")
      expect(anonymous).to include("batch_id" => nil, "reason" => "undecodable", "steps" => [])
      batch_id = peer.send_batch(worker_id, [step(2, "Double")])
      peer.wait_for("the next batch's completion") { peer.completions(batch_id).any? }
      expect(@worker.stats[:bad_messages]).to include(undecodable: 2)
    end
  end

  describe "outputs" do
    it "fails a result over the batch's limits, or nested too deep, instead of sending it" do
      start_worker
      limits = { max_result_bytes: 4000, max_message_bytes: 1 << 20, max_payload_depth: 6 }
      batch_id = peer.send_batch(worker_id, [step(1, "Big", handler_config: { "bytes" => 5000 }),
                                             step(2, "Big", handler_config: { "bytes" => 100 }),
                                             step(3, "Deep", handler_config: { "levels" => 6 }),
                                             step(4, "Deep", handler_config: { "levels" => 5 }),
                                             step(5, "LongFailure")], limits: limits)
      peer.wait_for("the completion") { peer.completions(batch_id).any? }
      too_large = partial(batch_id, 1)["error"]
      expect(too_large).to include("class" => "TaskerCore::PayloadTooLargeError", "retryable" => false)
      expect(too_large["message"]).to match(/result is \d{4} bytes, over the orchestrator's limit of 4000 bytes/)
      expect(partial(batch_id, 2)).to include("status" => "complete")
      expect(partial(batch_id, 3)["error"]).to include("class" => "TaskerCore::PayloadTooDeepError", "retryable" => false)
      expect(partial(batch_id, 3)["error"]["message"]).to include("max_payload_depth of 6")
      expect(partial(batch_id, 4)).to include("status" => "complete")
      # A failure too long to send keeps its class and retry decision.
      expect(partial(batch_id, 5)["error"]).to include("class" => "TaskerCore::RetryableError", "retryable" => true)
      expect(partial(batch_id, 5)["error"]["message"]).to include("cut:")
      expect(@worker.stats).to include(outputs_too_large: 1, outputs_too_deep: 1)
    end

    it "uses its own max_result_bytes when a batch carries no limits" do
      start_worker(max_result_bytes: 3000)
      batch_id = peer.send_batch(worker_id, [step(1, "Big", handler_config: { "bytes" => 4000 })])
      peer.wait_for("the partial") { partial(batch_id, 1) }
      expect(partial(batch_id, 1)["error"]["message"]).to include("limit of 3000 bytes (max_result_bytes)")
    end
  end

  describe "sockets" do
    it "reopens its batch socket when libzmq drops the connection over a message too large, and takes later batches" do
      start_worker(max_message_bytes: 10_000)
      topic = TaskerCore::Protocol.batch_topic(worker_id)
      huge = TaskerCore::Protocol.batch(batch_id: "huge", worker_id: worker_id,
                                        steps: [step(1, "Double", context: { "pad" => "z" * 20_000 })])
      expect(peer.send_raw(TaskerCore::Protocol.encode(huge))).to be(true)
      peer.wait_for("the worker to subscribe again") do
        peer.batch_subscriptions.count { |kind, t| kind == :subscribe && t == topic } >= 2
      end
      expect(peer.batch_subscriptions).to include([:unsubscribe, topic])
      batch_id = peer.send_batch(worker_id, [step(2, "Double")])
      peer.wait_for("the later batch's completion") { peer.completions(batch_id).any? }
      expect(partial(batch_id, 2)).to include("output" => { "value" => 4 })
      expect(@worker.stats[:sockets_reopened]).to be >= 1
      expect(log.string).to include("the batch socket lost its connection")
    end

    it "keeps its CURVE keys when it moves to another orchestrator" do
      server_pub, server_sec = TaskerCore::Curve.keypair
      worker_pub, worker_sec = TaskerCore::Curve.keypair
      first = ProtocolPeer.new(curve_secret_key: server_sec, allowed_client_keys: [worker_pub])
      @other = second = ProtocolPeer.new(curve_secret_key: server_sec, allowed_client_keys: [worker_pub])
      start_worker(on: first, curve: { server_key: server_pub, public_key: worker_pub, secret_key: worker_sec },
                   max_batch_steps: 3)
      @worker.reconnect(batch_endpoint: second.batch_endpoint, result_endpoint: second.result_endpoint)
      second.wait_for_worker(worker_id)
      batch_id = second.send_batch(worker_id, [step(1, "Double"), step(2, "Double"), step(3, "Double"), step(4, "Double")])
      second.wait_for("the completion") { second.completions(batch_id).any? }
      expect(second.partials(batch_id).size).to eq(3)
      expect(only(second.of_type("batch_refusal"))["steps"].map { |s| s["step_id"] }).to eq([4])
      expect(second.heartbeats.last["limits"]).to include("max_batch_steps" => 3)
    ensure
      first&.close
    end

    it "warns about a refused CURVE handshake once, and counts every one" do
      server_pub, server_sec = TaskerCore::Curve.keypair
      worker_pub, worker_sec = TaskerCore::Curve.keypair
      @other = closed_door = ProtocolPeer.new(curve_secret_key: server_sec, allowed_client_keys: [])
      @worker = described_class.new(step_sub_endpoint: closed_door.batch_endpoint,
                                    result_pub_endpoint: closed_door.result_endpoint, max_workers: 1,
                                    handler_registry: registry, worker_id: worker_id, logger: Logger.new(log),
                                    curve: { server_key: server_pub, public_key: worker_pub, secret_key: worker_sec },
                                    reopen_grace_s: 0.05).start
      wait_until(timeout: 15, message: "several refused handshakes") do
        closed_door.poll(timeout_ms: 20)
        @worker.stats[:handshake_failures].values.sum >= 3
      end
      expect(@worker.stats[:handshake_failures].keys).to include(:handshake_failed_auth)
      expect(log.string.scan("(handshake_failed_auth)").size).to eq(1)
      expect(log.string).to include("allow-list")
      expect(closed_door.heartbeats).to be_empty
    end
  end
end
