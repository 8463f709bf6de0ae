# frozen_string_literal: true

RSpec.describe TaskerCore::OrchestrationHandle do
  let(:heartbeat_timeout_ms) { 10_000 }
  let(:handle) do
    described_class.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                        send_hwm: 1000, recv_hwm: 1000, linger_ms: 0, heartbeat_timeout_ms: heartbeat_timeout_ms)
  end
  let(:peers) { [] }
  let(:loops) { ENV["TASKER_CORE_GC_STRESS"] == "1" ? 2 : 20 }

  after do
    peers.each(&:close)
    handle.close
  end

  def new_peer(id, capacity: 4, version: 1)
    cfg = handle.zeromq_config
    WorkerPeer.new(id: id, batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"],
                   capacity: capacity, version: version).tap { |p| peers << p }
  end

  def live_ids
    handle.workers.map { |w| w["id"] }.sort
  end

  # Start-up as docs/protocol.md has it; the handle is polled meanwhile
  # (by #workers) because a bound SUB sends its subscription only then.
  def start_peer(id, capacity: 4, version: 1)
    peer = new_peer(id, capacity: capacity, version: version)
    wait_until(message: "orchestrator subscription at #{id}") { handle.workers && peer.orchestrator_seen?(timeout_ms: 5) }
    peer.heartbeat
    wait_until(message: "#{id} live") { live_ids.include?(id) }
    peer
  end

  def steps(n, first: 1, attempt: 1)
    Array.new(n) { |i| { "step_id" => first + i, "task_id" => 100, "step_name" => "s#{first + i}", "handler" => "H", "attempt" => attempt } }
  end

  def collect_results(count)
    got = []
    wait_until(message: "#{count} results") do
      got.concat(handle.receive_results(timeout_ms: 50))
      got.size >= count
    end
    got
  end

  describe "configuration" do
    it "reports the endpoints it really bound, ports included" do
      cfg = handle.zeromq_config
      expect(cfg["batch_endpoint"]).to match(%r{\Atcp://127\.0\.0\.1:[1-9]\d*\z})
      expect(cfg["result_endpoint"]).to match(%r{\Atcp://127\.0\.0\.1:[1-9]\d*\z})
      expect(cfg.values_at("send_hwm", "recv_hwm", "linger_ms", "heartbeat_timeout_ms")).to eq([1000, 1000, 0, heartbeat_timeout_ms])
      expect(handle.zeromq_enabled?).to be(true)
      expect(handle.is_zeromq_enabled).to be(true)
    end

    it "raises ConnectionError naming the endpoint when it cannot bind" do
      busy = handle.zeromq_config["batch_endpoint"]
      expect do
        described_class.new(batch_endpoint: busy, result_endpoint: "tcp://127.0.0.1:*")
      end.to raise_error(TaskerCore::ConnectionError, /#{Regexp.escape(busy)}/)
    end

    it "binds nothing when disabled and refuses to publish" do
      h = described_class.new(batch_endpoint: "tcp://127.0.0.1:1", result_endpoint: "tcp://127.0.0.1:2", enabled: false)
      expect(h.zeromq_enabled?).to be(false)
      expect(h.zeromq_config["batch_endpoint"]).to eq("tcp://127.0.0.1:1")
      expect(h.receive_results).to eq([])
      expect(h.workers).to eq([])
      expect { h.publish_batch({ "steps" => steps(1) }) }.to raise_error(TaskerCore::ConfigurationError)
      h.close
    end
  end

  describe "worker liveness" do
    it "lists a peer only after both its subscription and a heartbeat arrived" do
      peer = new_peer("w1", capacity: 3)
      wait_until(message: "subscription seen") { handle.workers && handle.stats[:subscriptions] >= 1 }
      expect(live_ids).to eq([])
      wait_until { handle.workers && peer.orchestrator_seen?(timeout_ms: 5) }
      peer.heartbeat
      wait_until(message: "w1 live") { live_ids == ["w1"] }
      w = handle.workers.first
      expect(w).to include("id" => "w1", "capacity" => 3, "in_flight" => 0, "free" => 3, "pid" => Process.pid)
      expect(w["host"]).to eq(Socket.gethostname)
      expect(w["last_heartbeat_at"]).to be_a(Time)
    end

    it "keeps a heartbeat's optional connection totals, ignoring a malformed one but not the heartbeat" do
      peer = start_peer("w1")
      expect(handle.workers.first).to include("connects" => 0, "disconnects" => 0, "last_connection_event" => nil,
                                              "last_connection_event_at" => nil)
      peer.heartbeat(connection: { "connects" => 3, "disconnects" => 1, "last_event" => "connected",
                                   "last_event_at" => 1_732_300_000.5 })
      wait_until(message: "connection totals") { handle.workers.first["connects"] == 3 }
      w = handle.workers.first
      expect(w).to include("disconnects" => 1, "last_connection_event" => "connected")
      expect(w["last_connection_event_at"].to_f).to be_within(0.001).of(1_732_300_000.5)

      beats = handle.stats[:heartbeats]
      peer.heartbeat(capacity: 9, connection: "not a map")
      wait_until(message: "the next heartbeat") { handle.workers.first["capacity"] == 9 }
      expect(handle.workers.first).to include("connects" => 0, "last_connection_event" => nil)
      peer.heartbeat(capacity: 8, connection: { "connects" => "x", "disconnects" => 2, "last_event" => 5,
                                                "last_event_at" => "y" })
      wait_until(message: "the next heartbeat") { handle.workers.first["capacity"] == 8 }
      expect(handle.workers.first).to include("connects" => 0, "disconnects" => 2, "last_connection_event" => nil,
                                              "last_connection_event_at" => nil)
      peer.heartbeat(capacity: 7, connection: { "connects" => 1 << 40, "disconnects" => 1, "last_event" => "up'; --",
                                                "last_event_at" => 1e300 })
      wait_until(message: "the next heartbeat") { handle.workers.first["capacity"] == 7 }
      expect(handle.workers.first).to include("connects" => 0, "disconnects" => 1, "last_connection_event" => nil,
                                              "last_connection_event_at" => nil)
      expect(handle.stats[:heartbeats]).to eq(beats + 3)
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "keeps the queues a heartbeat advertises; absent or malformed reads as default, the heartbeat still counts" do
      peer = start_peer("w1")
      expect(handle.workers.first["queues"]).to eq(["default"])
      peer.heartbeat(capacity: 9, queues: %w[critical py.v2 a:b-c_d])
      wait_until(message: "queues") { handle.workers.first["capacity"] == 9 }
      expect(handle.workers.first["queues"]).to eq(%w[critical py.v2 a:b-c_d])
      beats = handle.stats[:heartbeats]
      [["bad name"], [], Array.new(17) { |i| "q#{i}" }, ["x" * 64], "critical", [1]].each_with_index do |bad, i|
        peer.heartbeat(capacity: 20 + i, queues: bad)
        wait_until(message: "heartbeat #{i}") { handle.workers.first["capacity"] == 20 + i }
        expect(handle.workers.first["queues"]).to eq(["default"]), bad.inspect
      end
      expect(handle.stats[:heartbeats]).to eq(beats + 6)
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "does not list a peer that heartbeats without subscribing" do
      cfg = handle.zeromq_config
      pub = TaskerCore::Socket::Publisher.new(connect: cfg["result_endpoint"])
      wait_until { handle.workers && pub.subscriptions(timeout_ms: 5).any? }
      pub.send_message("heartbeat", TaskerCore::Codec.pack({ "protocol_version" => 1, "type" => "heartbeat",
                                                              "worker_id" => "ghost", "capacity" => 5, "in_flight" => 0 }))
      wait_until(message: "heartbeat counted") { handle.workers && handle.stats[:heartbeats] == 1 }
      expect(live_ids).to eq([])
      expect { handle.publish_batch({ "steps" => steps(1) }) }.to raise_error(TaskerCore::NoWorkersError)
    ensure
      pub&.close
    end
  end

  describe "#publish_batch" do
    it "raises NoWorkersError saying how many workers are live and their free capacity" do
      expect { handle.publish_batch({ "steps" => steps(1) }) }
        .to raise_error(TaskerCore::NoWorkersError, /0 live worker/)
      start_peer("w1", capacity: 2)
      expect { handle.publish_batch({ "steps" => steps(1) }) }.not_to raise_error
      expect { handle.publish_batch({ "steps" => steps(2, first: 10) }) }
        .to raise_error(TaskerCore::NoWorkersError, %r{1 live worker.*w1=1/2})
    end

    it "builds the batch as the loop does: the envelope and the handle's limits win, other keys ride along" do
      peer = start_peer("w1", capacity: 4)
      handle.publish_batch({ "batch_id" => "b7", "steps" => steps(2), "type" => "forged",
                             "limits" => { "max_payload_depth" => 1 }, "trace" => { "id" => "t1" } })
      batch = peer.receive_batches(timeout_ms: 5000).first
      expect(batch).to include("protocol_version" => 1, "type" => "batch", "batch_id" => "b7", "worker_id" => "w1",
                               "trace" => { "id" => "t1" })
      expect(batch["limits"]).to eq(handle.zeromq_config.slice("max_result_bytes", "max_payload_depth")
                                          .merge("max_message_bytes" => 2**63 - 1))
      expect(batch["steps"]).to eq(steps(2))
    end

    it "addresses exactly one worker, the one with the most free capacity, and only it receives the batch" do
      a = start_peer("wa", capacity: 2)
      b = start_peer("wb", capacity: 6)
      c = start_peer("wc", capacity: 4)

      expect(handle.publish_batch({ "steps" => steps(3, first: 1) })).to eq("wb") # free 2/6/4 -> wb (3 left)
      expect(handle.publish_batch({ "steps" => steps(3, first: 4) })).to eq("wc") # free 2/3/4 -> wc (1 left)
      expect(handle.publish_batch({ "steps" => steps(2, first: 7) })).to eq("wb") # free 2/3/1 -> wb (1 left)
      expect(handle.publish_batch({ "steps" => steps(2, first: 9) })).to eq("wa") # free 2/1/1 -> wa
      expect { handle.publish_batch({ "steps" => steps(2, first: 11) }) }.to raise_error(TaskerCore::NoWorkersError)

      wait_until(message: "batches delivered") do
        [a, b, c].each { |p| p.receive_batches(timeout_ms: 5) }
        [a, b, c].sum { |p| p.batches.size } == 4
      end
      expect([a, b, c].map { |p| p.batches.size }).to eq([1, 2, 1])
      expect(b.batches.flat_map { |x| x["steps"].map { |s| s["step_id"] } }).to eq([1, 2, 3, 7, 8])
      batch = b.batches.first
      expect(batch).to include("protocol_version" => 1, "type" => "batch", "worker_id" => "wb")
      expect(batch["batch_id"]).to be_a(String)
      expect(batch["sent_at"]).to be_a(Float)
      expect(handle.workers.to_h { |w| [w["id"], w["in_flight"]] }).to eq("wa" => 2, "wb" => 5, "wc" => 3)
      expect(handle.stats).to include(batches_published: 4, steps_published: 10)
    end

    it "keeps a given batch_id and generates unique ones otherwise" do
      peer = start_peer("w1", capacity: 1000)
      handle.publish_batch({ "batch_id" => "mine-1", "steps" => steps(1) })
      loops.times { |i| handle.publish_batch({ "steps" => steps(1, first: 10 + i) }) }
      wait_until { peer.receive_batches(timeout_ms: 5) && peer.batches.size == loops + 1 }
      ids = peer.batches.map { |x| x["batch_id"] }
      expect(ids.first).to eq("mine-1")
      expect(ids.uniq.size).to eq(ids.size)
    end

    it "gives a batch larger than every capacity to a fully idle worker only" do
      peer = start_peer("w1", capacity: 2)
      expect(handle.publish_batch({ "steps" => steps(5) })).to eq("w1")
      expect { handle.publish_batch({ "steps" => steps(5, first: 10) }) }.to raise_error(TaskerCore::NoWorkersError)
      expect(handle.workers.first["free"]).to eq(-3)
      peer.receive_batches(timeout_ms: 1000)
      expect(peer.batches.first["steps"].size).to eq(5)
    end

    it "rejects malformed batches with ArgumentError before sending anything" do
      start_peer("w1")
      expect { handle.publish_batch({ "steps" => [] }) }.to raise_error(ArgumentError)
      expect { handle.publish_batch({ "steps" => [{ "step_id" => 1, "task_id" => 1 }] }) }.to raise_error(ArgumentError, /attempt/)
      expect { handle.publish_batch({ "batch_id" => "x" * 64, "steps" => steps(1) }) }.to raise_error(ArgumentError)
      expect(handle.stats[:batches_published]).to eq(0)
    end

    it "waits up to timeout_ms for a worker that starts after the call began (another process)", :spawns do
      cfg = handle.zeromq_config
      pid = nil
      caller_thread = Thread.current
      starter = Thread.new do
        # The peer starts only once publish_batch is blocked waiting.
        Thread.pass until caller_thread.status == "sleep"
        pid = spawn_ruby(WORKER_PEER_SCRIPT, "late", cfg["batch_endpoint"], cfg["result_endpoint"], "4", out: File::NULL)
      end
      expect(handle.publish_batch({ "steps" => steps(2) }, timeout_ms: 20_000)).to eq("late")
      starter.join
      expect(pid).to be_a(Integer)
    end

    it "raises NoWorkersError when timeout_ms passes without a worker" do
      expect { handle.publish_batch({ "steps" => steps(1) }, timeout_ms: 30) }.to raise_error(TaskerCore::NoWorkersError)
    end

    it "counts and raises a send refused at the high-water mark, recording nothing in flight" do
      small = described_class.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                  send_hwm: 1, heartbeat_timeout_ms: 60_000)
      cfg = small.zeromq_config
      sub = TaskerCore::Socket::Subscriber.new(connect: cfg["batch_endpoint"], topics: ["batch.slow."], recv_hwm: 1)
      pub = TaskerCore::Socket::Publisher.new(connect: cfg["result_endpoint"])
      wait_until { small.workers && pub.subscriptions(timeout_ms: 5).any? }
      pub.send_message("heartbeat", TaskerCore::Codec.pack({ "protocol_version" => 1, "type" => "heartbeat",
                                                              "worker_id" => "slow", "capacity" => 1_000_000, "in_flight" => 0 }))
      wait_until { small.workers.any? }
      big = "x" * 100_000
      error = nil
      published = 0
      10_000.times do |i|
        small.publish_batch({ "steps" => [{ "step_id" => i, "task_id" => 1, "attempt" => 1, "pad" => big }] })
        published += 1
      rescue TaskerCore::ConnectionError => e
        error = e
        break
      end
      expect(error.message).to match(/high-water mark/)
      expect(small.stats[:send_refused]).to eq(1)
      expect(small.stats[:batches_published]).to eq(published)
      expect(small.workers.first["in_flight"]).to eq(published)
    ensure
      sub&.close
      pub&.close
      small&.close
    end
  end

  describe "#receive_results" do
    it "returns partial results and completions in arrival order and frees credit" do
      peer = start_peer("w1", capacity: 4)
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(3) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      batch["steps"].reverse_each { |s| peer.partial(batch, s) }
      peer.completion(batch)
      got = collect_results(4)
      expect(got.map { |r| r["type"] }).to eq(%w[partial_result partial_result partial_result batch_completion])
      expect(got.first(3).map { |r| r["step_id"] }).to eq([3, 2, 1])
      expect(handle.workers.first["in_flight"]).to eq(0)
      expect(handle.stats[:results_received]).to eq(partial_result: 3, partial_results: 0, batch_completion: 1)
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "applies each entry of a version 2 partial_results exactly as a partial_result, across batches" do
      peer = start_peer("w1", capacity: 8, version: 2)
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(2) })
      handle.publish_batch({ "batch_id" => "b2", "steps" => steps(2, first: 3) })
      batches = []
      wait_until(message: "both batches") { batches.concat(peer.receive_batches(timeout_ms: 50)).size == 2 }
      expect(batches.map { |b| b["protocol_version"] }).to eq([2, 2])
      b1, b2 = batches
      entries = [peer.entry(b1["steps"][1], batch_id: "b1", output: { "n" => 2, "bin" => "\x00\xff".b }),
                 peer.entry(b2["steps"][0], batch_id: "b2"),
                 peer.entry(b1["steps"][0], batch_id: "b1", status: "error", output: nil)
                     .merge("error" => { "class" => "ValueError", "message" => "no", "backtrace" => [], "retryable" => false,
                                         "retry_after" => nil })]
      peer.partials(entries)
      got = collect_results(3)
      expect(got.map { |r| [r["type"], r["protocol_version"], r["worker_id"], r["batch_id"], r["step_id"]] })
        .to eq([["partial_result", 2, "w1", "b1", 2], ["partial_result", 2, "w1", "b2", 3], ["partial_result", 2, "w1", "b1", 1]])
      expect(got[0]["output"]).to eq("n" => 2, "bin" => "\x00\xff".b)
      expect(got[2]).to include("status" => "error", "error" => include("class" => "ValueError", "retryable" => false))
      expect(handle.workers.first["in_flight"]).to eq(1)
      expect(handle.stats[:results_received]).to include(partial_result: 3, partial_results: 1)
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "counts a bad entry of a partial_results by its reason and still applies the others" do
      peer = start_peer("w1", capacity: 8, version: 2)
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(4) })
      s = peer.receive_batches(timeout_ms: 5000).first["steps"]
      peer.partials([peer.entry(s[0], batch_id: "b1"),
                     peer.entry(s[0], batch_id: "b1"),                           # a second result: duplicate
                     peer.entry(s[1], batch_id: "other"),                        # not the batch it was sent in
                     peer.entry(s[1], batch_id: "b1", output: { 1 => "int key" }), # version 2 keys are strings
                     peer.entry(s[2], batch_id: "b1").except("attempt"),           # a field missing
                     peer.entry(s[2], batch_id: "b1").merge("worker_id" => "w2"),  # an envelope key in an entry
                     peer.entry(s[3], batch_id: "b1")])
      got = collect_results(2)
      wait_until(message: "the message read") { handle.stats[:results_received][:partial_results] == 1 }
      expect(got.map { |r| r["step_id"] }).to eq([1, 4])
      expect(handle.stats[:bad_messages]).to include(duplicate_result: 1, not_dispatched: 1, invalid_fields: 3)
      # the envelope itself broken: the whole message is refused
      peer.raw(["partial_results", TaskerCore::Codec.pack({ "protocol_version" => 2, "type" => "partial_results",
                                                           "worker_id" => "w1", "results" => [1] })])
      peer.partials([]) # no entries
      peer.partials([peer.entry(s[1], batch_id: "b1")], version: 1) # no partial_results in version 1
      wait_until(message: "all three refused") do
        expect(handle.receive_results(timeout_ms: 20)).to eq([])
        handle.stats[:bad_messages][:invalid_fields] == 5 && handle.stats[:bad_messages][:unknown_type] == 1
      end
      peer.partials([peer.entry(s[1], batch_id: "b1"), peer.entry(s[2], batch_id: "b1")])
      expect(collect_results(2).map { |r| r["step_id"] }).to eq([2, 3])
      expect(handle.workers.first["in_flight"]).to eq(0)
    end

    it "keeps accepting version 1 results as before, non-string output keys included" do
      peer = start_peer("w1", version: 1)
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(1) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      expect(batch["protocol_version"]).to eq(1)
      peer.partial(batch, batch["steps"].first, output: { 1 => "one" })
      expect(collect_results(1).first).to include("protocol_version" => 1, "output" => { 1 => "one" })
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "sends each worker batches in the version of its latest heartbeat" do
      old = start_peer("old", capacity: 1, version: 1)
      new = start_peer("new", capacity: 1, version: 2)
      2.times { handle.publish_batch({ "steps" => steps(1) }) }
      got = {}
      wait_until(message: "a batch each") do
        [old, new].each { |p| p.receive_batches(timeout_ms: 10).each { |b| got[p.id] = b } }
        got.size == 2
      end
      expect(got.transform_values { |b| b["protocol_version"] }).to eq("old" => 1, "new" => 2)
      expect(got.values.map(&:keys)).to all(match_array(%w[protocol_version type batch_id worker_id sent_at limits steps]))
    end

    it "is non-blocking by default" do
      expect(handle.receive_results).to eq([])
    end

    it "buffers results read while publish_batch waited" do
      peer = start_peer("w1", capacity: 1)
      handle.publish_batch({ "steps" => steps(1) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      peer.partial(batch, batch["steps"].first)
      # The partial frees the one slot: publish_batch reads it while waiting.
      expect(handle.publish_batch({ "steps" => steps(1, first: 2) }, timeout_ms: 10_000)).to eq("w1")
      expect(handle.receive_results.map { |r| r["step_id"] }).to eq([1])
    end

    it "returns a step's result once: a duplicate or an attempt never sent is counted and dropped" do
      peer = start_peer("w1")
      handle.publish_batch({ "steps" => steps(1) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      2.times { peer.partial(batch, batch["steps"].first) }
      peer.partial(batch, batch["steps"].first, attempt: 7)
      got = collect_results(1)
      wait_until(message: "all three read") { handle.receive_results.empty? && handle.stats[:results_received][:partial_result] == 3 }
      expect(got.map { |r| [r["step_id"], r["attempt"]] }).to eq([[1, 1]])
      expect(handle.stats[:bad_messages]).to include(duplicate_result: 1, not_dispatched: 1)
      expect(handle.workers.first["in_flight"]).to eq(0)
    end

    it "frees credit of steps whose partial never came once their batch completes" do
      peer = start_peer("w1", capacity: 4)
      handle.publish_batch({ "steps" => steps(3) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      peer.partial(batch, batch["steps"].first)
      peer.completion(batch)
      collect_results(2)
      expect(handle.workers.first["in_flight"]).to eq(0)
      expect(handle.stats[:steps_released_by_completion]).to eq(2)
    end

    it "waits with timeout_ms until a result arrives" do
      peer = start_peer("w1")
      handle.publish_batch({ "steps" => steps(1) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      peer.partial(batch, batch["steps"].first)
      expect(handle.receive_results(timeout_ms: 10_000).map { |r| r["step_id"] }).to eq([1])
    end

    it "is interrupted by Thread#raise while waiting" do
      h = handle
      waiting = Thread.current
      entered = false
      # Raised only once this thread is inside the block and asleep: a raise
      # that landed earlier (under GC.stress this thread can be seen asleep
      # before the block) would prove nothing about the wait.
      interrupter = Thread.new do
        Thread.pass until entered && waiting.status == "sleep"
        waiting.raise(RuntimeError, "stop waiting")
      end
      expect do
        entered = true
        h.receive_results(timeout_ms: 60_000)
      end.to raise_error(RuntimeError, "stop waiting")
      interrupter.join
      expect(handle.receive_results).to eq([])
    end
  end

  describe "lost workers" do
    let(:heartbeat_timeout_ms) { 1000 }

    it "reports a peer that stops heartbeating, with what it had in flight" do
      peer = start_peer("w1")
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(2) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      peer.partial(batch, batch["steps"].first)
      got = []
      wait_until(message: "worker_lost") do
        got.concat(handle.receive_results(timeout_ms: 1000))
        got.any? { |r| r["type"] == "worker_lost" }
      end
      lost = got.find { |r| r["type"] == "worker_lost" }
      expect(lost).to eq("type" => "worker_lost", "worker_id" => "w1", "reason" => "heartbeat_timeout",
                         "in_flight" => [{ "batch_id" => "b1", "step_id" => 2, "task_id" => 100, "attempt" => 1 }])
      expect(live_ids).to eq([])
      expect(handle.stats[:workers_lost]).to eq(1)
      # Back with a heartbeat, it is live again (it never unsubscribed).
      peer.heartbeat
      back = wait_until(message: "w1 live again") { handle.workers.find { |w| w["id"] == "w1" } }
      expect(back["in_flight"]).to eq(0)
    end

    context "with a generous heartbeat timeout" do
      let(:heartbeat_timeout_ms) { 60_000 }

      it "reports a goodbye; a worker still subscribed that heartbeats again is live again" do
        peer = start_peer("w1")
        handle.publish_batch({ "steps" => steps(1) })
        peer.goodbye("shutdown")
        got = collect_results(1)
        expect(got.first).to include("type" => "worker_lost", "worker_id" => "w1", "reason" => "goodbye")
        expect(got.first["in_flight"].map { |s| s["step_id"] }).to eq([1])
        expect(live_ids).to eq([])
        # A goodbye (or a forged one) never disables a worker for good.
        peer.heartbeat
        wait_until(message: "w1 live again") { live_ids == ["w1"] }
        expect(handle.workers.first["in_flight"]).to eq(0)
        expect(handle.publish_batch({ "steps" => steps(1, first: 2) })).to eq("w1")
      end

      it "does not revive a worker that shut down in order (unsubscribe, goodbye) on a stray heartbeat" do
        peer = start_peer("w1")
        peer.unsubscribe
        peer.goodbye("shutdown")
        wait_until(message: "goodbye and unsubscription read") do
          handle.receive_results
          handle.stats[:goodbyes] == 1 && handle.stats[:unsubscriptions] == 1
        end
        peer.heartbeat
        wait_until { handle.workers && handle.stats[:heartbeats] >= 2 }
        expect(live_ids).to eq([])
      end

      it "takes the results of a peer that unsubscribes with steps in flight, sends it nothing, and frees it at its goodbye" do
        peer = start_peer("w1")
        handle.publish_batch({ "batch_id" => "b1", "steps" => steps(2) })
        batch = nil
        wait_until(message: "the batch") { batch = peer.receive_batches(timeout_ms: 20).first }
        # a draining worker's last result can reach us after its unsubscription
        peer.unsubscribe
        wait_until(message: "the unsubscription read") { handle.receive_results.empty? && handle.stats[:unsubscriptions] == 1 }
        expect(handle.workers.first).to include("id" => "w1", "leaving" => true)
        expect { handle.publish_batch({ "steps" => steps(1, first: 9) }) }.to raise_error(TaskerCore::Error, /no live worker/)
        peer.partial(batch, batch["steps"][0])
        peer.goodbye
        got = collect_results(2)
        expect(got.first).to include("type" => "partial_result", "step_id" => 1)
        expect(got.last).to include("type" => "worker_lost", "reason" => "goodbye")
        expect(got.last["in_flight"].map { |st| st["step_id"] }).to eq([2])
        expect(live_ids).to eq([])
        expect(handle.stats[:bad_messages][:unknown_worker]).to eq(0)
      end

      it "takes back the steps of a peer that unsubscribed and said nothing more, after a grace" do
        peer = start_peer("w1")
        handle.publish_batch({ "batch_id" => "b1", "steps" => steps(1) })
        wait_until(message: "the batch") { peer.receive_batches(timeout_ms: 20).any? }
        peer.unsubscribe
        wait_until(message: "the unsubscription read") { handle.receive_results.empty? && handle.stats[:unsubscriptions] == 1 }
        # not at once: it is heard a while longer
        expect(handle.workers.first).to include("id" => "w1", "leaving" => true, "in_flight" => 1)
        got = collect_results(1)
        expect(got.first).to include("type" => "worker_lost", "worker_id" => "w1", "reason" => "unsubscribed")
        expect(got.first["in_flight"].map { |st| st["step_id"] }).to eq([1])
        expect(live_ids).to eq([])
      end

      it "takes back at once the steps of a peer that subscribes again while leaving, and starts it afresh" do
        peer = start_peer("w1", capacity: 2)
        handle.publish_batch({ "batch_id" => "b1", "steps" => steps(2) })
        wait_until(message: "the batch") { peer.receive_batches(timeout_ms: 20).any? }
        peer.unsubscribe
        wait_until(message: "the unsubscription read") { handle.receive_results.empty? && handle.stats[:unsubscriptions] == 1 }
        # the same worker on a new connection: what the old one held may never have arrived
        again = start_peer("w1", capacity: 2)
        got = collect_results(1)
        expect(got.first).to include("type" => "worker_lost", "worker_id" => "w1", "reason" => "unsubscribed")
        expect(got.first["in_flight"].map { |st| st["step_id"] }).to eq([1, 2])
        expect(handle.workers.first).to include("id" => "w1", "in_flight" => 0, "free" => 2, "leaving" => false)
        expect(handle.publish_batch({ "steps" => steps(2, first: 3) })).to eq("w1")
        expect(again.receive_batches(timeout_ms: 2000).size).to eq(1)
      end

      it "reports a peer that unsubscribes" do
        peer = start_peer("w1")
        peer.unsubscribe
        got = collect_results(1)
        expect(got.first).to include("type" => "worker_lost", "worker_id" => "w1", "reason" => "unsubscribed", "in_flight" => [])
      end

      it "reports a peer process killed with SIGKILL, with its in-flight steps", :spawns do
        cfg = handle.zeromq_config
        out_r, out_w = IO.pipe
        pid = spawn_ruby(WORKER_PEER_SCRIPT, "doomed", cfg["batch_endpoint"], cfg["result_endpoint"], "4", out: out_w)
        out_w.close
        wait_until(message: "peer live") { live_ids.include?("doomed") }
        handle.publish_batch({ "batch_id" => "bk", "steps" => steps(2) })
        wait_until(message: "peer got the batch") { out_r.wait_readable(0.05) && out_r.gets.to_s.start_with?("batch bk") }
        Process.kill(:KILL, -pid)
        got = collect_results(1)
        expect(got.first).to include("type" => "worker_lost", "worker_id" => "doomed", "reason" => "unsubscribed")
        expect(got.first["in_flight"].map { |s| [s["batch_id"], s["step_id"]] }.sort).to eq([["bk", 1], ["bk", 2]])
      ensure
        out_r&.close
      end
    end
  end

  describe "bad input on the result channel" do
    it "counts every kind, logs each kind once, and keeps serving" do
      logged = []
      logger = Object.new
      logger.define_singleton_method(:warn) { |m| logged << m }
      settable = TaskerCore.respond_to?(:logger=)
      if settable
        TaskerCore.logger = logger
      else
        TaskerCore.define_singleton_method(:logger) { logger }
      end

      peer = start_peer("w1")
      pack = ->(h) { TaskerCore::Codec.pack(h) }
      loops.times do
        peer.raw(["only one frame"])
        peer.raw(%w[a b c])
        peer.raw(["partial_result", "\xC1garbage".b])
        peer.raw(["partial_result", pack.call({ "protocol_version" => 3, "type" => "partial_result" })])
        peer.raw(["partial_result", pack.call({ "type" => "partial_result" })])
        peer.raw(["mystery", pack.call({ "protocol_version" => 1, "type" => "mystery" })])
        peer.raw(["partial_result", pack.call({ "protocol_version" => 1, "type" => "partial_result", "worker_id" => "w1" })])
        peer.raw(["heartbeat", pack.call({ "protocol_version" => 1, "type" => "heartbeat", "worker_id" => "bad id!", "capacity" => 1 })])
        peer.partial({ "batch_id" => "b-1" }, { "step_id" => 1, "task_id" => 1, "attempt" => 1 }, worker_id: "nobody")
        peer.partial({ "batch_id" => "b-1" }, { "step_id" => 1, "task_id" => 1, "attempt" => 1 }, topic: "heartbeat")
        peer.raw(["partial_result", pack.call([1, 2, 3])])
      end
      results = []
      wait_until(message: "all bad input read") do
        results.concat(handle.receive_results)
        handle.stats[:result_socket][:messages_received] >= loops * 11 + 1
      end
      # Nothing of it is handed over: not even the unknown worker's partial.
      expect(results).to eq([])
      bad = handle.stats[:bad_messages]
      expect(bad).to eq(malformed_frame: 2 * loops, undecodable_body: 2 * loops, wrong_protocol_version: 2 * loops,
                        unknown_type: loops, invalid_fields: 2 * loops, unknown_worker: loops, duplicate_result: 0, too_large: 0,
                        topic_mismatch: loops, not_dispatched: 0)
      expect(logged.size).to eq(7)
      expect(logged.grep(/malformed_frame/).size).to eq(1)

      handle.publish_batch({ "steps" => steps(1) })
      batch = peer.receive_batches(timeout_ms: 5000).first
      peer.partial(batch, batch["steps"].first)
      expect(collect_results(1).first).to include("type" => "partial_result", "step_id" => 1)
    ensure
      if settable
        TaskerCore.logger = nil
      else
        TaskerCore.singleton_class.send(:remove_method, :logger)
      end
    end
  end

  describe "peers that could stop the work (issue 10)" do
    def heartbeat_body(id, **extra)
      TaskerCore::Codec.pack({ "protocol_version" => 1, "type" => "heartbeat", "worker_id" => id, "capacity" => 1_000_000,
                               "in_flight" => 0 }.merge(extra))
    end

    it "installs only batch.<worker id>. subscriptions: a non-reading \"\" subscriber gets nothing and holds up nobody", :spawns do
      small = described_class.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                  send_hwm: 10, heartbeat_timeout_ms: 60_000)
      cfg = small.zeromq_config
      expect(cfg["xpub_manual"]).to be(true)
      wide = ["", "batch.", "batch.w1", "other."].map do |t|
        TaskerCore::Socket::Subscriber.new(connect: cfg["batch_endpoint"], topics: [t], recv_hwm: 1)
      end
      wait_until(message: "wide subscriptions refused") { small.workers && small.stats[:subscriptions_refused] == 4 }
      out_r, out_w = IO.pipe
      spawn_ruby(WORKER_PEER_SCRIPT, "w1", cfg["batch_endpoint"], cfg["result_endpoint"], "1000000", out: out_w)
      out_w.close
      wait_until(message: "w1 live") { small.workers.any? }
      pad = "x" * 100_000
      200.times do |i|
        small.publish_batch({ "steps" => [{ "step_id" => i, "task_id" => 1, "attempt" => 1, "pad" => pad }] }, timeout_ms: 10_000)
      end
      lines = []
      wait_until(message: "200 batches at w1") do
        lines << out_r.gets while out_r.wait_readable(0.05)
        lines.count { |l| l.start_with?("batch ") } == 200
      end
      # Were any of them matched, its full pipe would have refused sends
      # (NODROP) long before 20 MB went out.
      expect(wide.map { |sub| sub.receive_many(timeout_ms: 50) }).to all(eq([]))
      expect(small.stats[:subscriptions]).to eq(1)
      expect(small.stats[:workers_not_reading]).to eq(0)
    ensure
      wide&.each(&:close)
      out_r&.close
      small&.close
    end

    it "backs off a worker refused at the high-water mark, drops it as not_reading, logs it once, and takes it back after it resubscribes" do
      logged = []
      logger = Object.new
      logger.define_singleton_method(:warn) { |m| logged << m }
      TaskerCore.logger = logger
      small = described_class.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                  send_hwm: 1, heartbeat_timeout_ms: 1000)
      cfg = small.zeromq_config
      sub = TaskerCore::Socket::Subscriber.new(connect: cfg["batch_endpoint"], topics: ["batch.slow."], recv_hwm: 1)
      pub = TaskerCore::Socket::Publisher.new(connect: cfg["result_endpoint"])
      wait_until { small.workers && pub.subscriptions(timeout_ms: 5).any? }
      pub.send_message("heartbeat", heartbeat_body("slow"))
      wait_until(message: "slow live") { small.workers.any? }
      big = "x" * 100_000
      sent = 0
      refusals = Hash.new(0)
      wait_until(timeout: 30, message: "slow dropped as not_reading") do
        pub.send_message("heartbeat", heartbeat_body("slow"))
        begin
          small.publish_batch({ "steps" => [{ "step_id" => sent + 1, "task_id" => 1, "attempt" => 1, "pad" => big }] })
          sent += 1
        rescue TaskerCore::ConnectionError, TaskerCore::NoWorkersError => e
          refusals[e.class] += 1
        end
        small.stats[:workers_not_reading] == 1
      end
      # Between refusals the worker was backing off: no new batch for it.
      expect(refusals[TaskerCore::NoWorkersError]).to be > 0
      lost = []
      wait_until(message: "worker_lost not_reading") do
        lost.concat(small.receive_results)
        lost.any? { |r| r["reason"] == "not_reading" }
      end
      event = lost.find { |r| r["reason"] == "not_reading" }
      expect(event).to include("type" => "worker_lost", "worker_id" => "slow")
      expect(event["in_flight"].map { |st| st["step_id"] }.sort).to eq((1..sent).to_a)
      # Still heartbeating, but not live until it subscribes again.
      pub.send_message("heartbeat", heartbeat_body("slow"))
      wait_until { small.workers && small.stats[:heartbeats] >= 3 }
      expect(small.workers).to eq([])
      expect { small.publish_batch({ "steps" => steps(1) }) }.to raise_error(TaskerCore::NoWorkersError)
      expect(logged.grep(/worker slow is not reading/).size).to eq(1)

      sub.close
      sub = TaskerCore::Socket::Subscriber.new(connect: cfg["batch_endpoint"], topics: ["batch.slow."])
      # Live again once the new connection subscribed; the old one (its
      # pipe still full) must be gone too before a send can pass.
      wait_until(message: "slow live again") do
        pub.send_message("heartbeat", heartbeat_body("slow"))
        small.workers.any? { |w| w["id"] == "slow" } && small.stats[:unsubscriptions] >= 1
      end
      expect(small.publish_batch({ "steps" => steps(1, first: 999) }, timeout_ms: 5000)).to eq("slow")
      expect(sub.receive(timeout_ms: 5000)).not_to be_nil
      expect(small.stats[:workers_not_reading]).to eq(1)
    ensure
      TaskerCore.logger = nil
      sub&.close
      pub&.close
      small&.close
    end

    it "applies a partial only from the worker it was sent to, with the batch it was sent in" do
      w1 = start_peer("w1")
      w2 = start_peer("w2")
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(2) }, timeout_ms: 0)
      owner, other = handle.workers.find { |w| w["in_flight"] == 2 }["id"] == "w1" ? [w1, w2] : [w2, w1]
      batch = owner.receive_batches(timeout_ms: 5000).first
      step = batch["steps"].first
      other.partial(batch, step, output: { "forged" => "by the other worker" })
      owner.partial(batch, step, worker_id: "nobody", output: { "forged" => "unknown worker" })
      owner.partial(batch, step, batch_id: "b-forged", output: { "forged" => "wrong batch" })
      owner.partial(batch, step, topic: "heartbeat", output: { "forged" => "wrong topic" })
      wait_until(message: "forgeries read") do
        handle.receive_results.empty? && handle.stats[:results_received][:partial_result] == 3 &&
          handle.stats[:bad_messages][:topic_mismatch] == 1
      end
      expect(handle.stats[:bad_messages]).to include(not_dispatched: 2, unknown_worker: 1, topic_mismatch: 1)
      expect(handle.workers.sum { |w| w["in_flight"] }).to eq(2)
      owner.partial(batch, step)
      got = collect_results(1)
      expect(got.map { |r| [r["worker_id"], r["step_id"], r["output"]] }).to eq([[owner.id, 1, { "ok" => true }]])
    end

    it "keeps a heartbeat's limits, ignoring values out of range, and defaults them when unsaid" do
      peer = start_peer("w1")
      expect(handle.workers.first["limits"]).to eq("max_batch_steps" => 10_000, "max_message_bytes" => 2**63 - 1,
                                                    "max_payload_depth" => 28)
      peer.heartbeat(capacity: 5, limits: { "max_batch_steps" => 50, "max_message_bytes" => 1_000_000, "max_payload_depth" => 12 })
      wait_until(message: "limits") { handle.workers.first["capacity"] == 5 }
      expect(handle.workers.first["limits"]).to eq("max_batch_steps" => 50, "max_message_bytes" => 1_000_000, "max_payload_depth" => 12)
      peer.heartbeat(capacity: 6, limits: { "max_batch_steps" => 0, "max_message_bytes" => "big", "max_payload_depth" => 7 })
      wait_until(message: "limits") { handle.workers.first["capacity"] == 6 }
      expect(handle.workers.first["limits"]).to eq("max_batch_steps" => 10_000, "max_message_bytes" => 2**63 - 1, "max_payload_depth" => 7)
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    end

    it "takes back, as lost, steps of batches up to last_batch_id that a heartbeat does not list" do
      peer = start_peer("w1", capacity: 10)
      handle.publish_batch({ "steps" => steps(2, first: 1) })
      handle.publish_batch({ "steps" => steps(2, first: 3) })
      handle.publish_batch({ "steps" => steps(2, first: 5) })
      handle.publish_batch({ "batch_id" => "given", "steps" => steps(1, first: 7) })
      b1, b2, b3, = wait_until(message: "4 batches") { peer.receive_batches(timeout_ms: 5) && peer.batches.size == 4 && peer.batches }
      # Malformed list or an id this handle never made: nothing changes (the heartbeat still counts).
      peer.heartbeat(capacity: 9, last_batch_id: b3["batch_id"], in_flight_steps: [[1, 1], "x"])
      peer.heartbeat(capacity: 8, last_batch_id: "given", in_flight_steps: [])
      peer.heartbeat(capacity: 7, last_batch_id: "#{b3['batch_id']}0", in_flight_steps: [])
      wait_until(message: "heartbeats") { handle.workers.first["capacity"] == 7 }
      expect(handle.workers.first["in_flight"]).to eq(7)
      # Up to b2: steps 1..4 were sent; it holds 1 and 4 (and b3, newer, is not judged).
      peer.heartbeat(capacity: 6, last_batch_id: b2["batch_id"], in_flight_steps: [[1, 1], [4, 1], [5, 1]])
      got = collect_results(1)
      expect(got.first).to include("type" => "steps_lost", "worker_id" => "w1", "reason" => "reconciled")
      expect(got.first["in_flight"].map { |st| [st["batch_id"], st["step_id"]] }.sort).to eq([[b1["batch_id"], 2], [b2["batch_id"], 3]])
      expect(handle.workers.first["in_flight"]).to eq(5)
      expect(handle.stats[:steps_reconciled]).to eq(2)
      expect(live_ids).to eq(["w1"])
    end

    it "acts on a batch_refusal from the worker the batch was sent to, and only then" do
      w1 = start_peer("w1", capacity: 10)
      handle.publish_batch({ "batch_id" => "b1", "steps" => steps(3, first: 1) })
      handle.publish_batch({ "batch_id" => "b2", "steps" => steps(2, first: 4) })
      handle.publish_batch({ "batch_id" => "b3", "steps" => steps(1, first: 6) })
      w2 = start_peer("w2", capacity: 10)
      w2.refusal("b1", reason: "draining") # not its batch
      w1.refusal("b1", reason: "too_deep", steps: [[1, 1, "too_deep", "x"], [99, 1, "too_deep", "x"]]) # 99 not in flight
      w1.refusal("b9", reason: "draining") # no such batch
      wait_until(message: "bad refusals read") { handle.receive_results.empty? && handle.stats[:bad_messages][:not_dispatched] == 3 }
      expect(handle.stats[:refusals]).to eq(0)
      expect(handle.workers.find { |w| w["id"] == "w1" }["in_flight"]).to eq(6)

      w1.refusal("b1", reason: "too_deep", message: "mixed",
                       steps: [[1, 1, "too_deep", "context nests 30 levels, over max_payload_depth 24"],
                               [2, 1, "invalid_step", "handler missing"], [3, 1, "unknown_handler", "no Foo"]])
      w1.refusal("b2", reason: "draining", message: "shutting down")
      w1.refusal(nil, reason: "undecodable", message: "?", steps: [[6, 1, "undecodable", "body cut"]])
      got = collect_results(5)
      expect(got.map { |r| [r["type"], r["reason"], r["error_class"], r["in_flight"].map { |st| st["step_id"] }.sort] }).to eq(
        [["steps_failed", "refused", "TaskerCore::PayloadTooDeepError", [1]],
         ["steps_failed", "refused", "TaskerCore::BatchRefusedError", [2]],
         ["steps_lost", "unknown_handler", nil, [3]],
         ["steps_lost", "draining", nil, [4, 5]],
         ["steps_lost", "refused", nil, [6]]]
      )
      expect(got.first["message"]).to eq("worker w1 refused the step: context nests 30 levels, over max_payload_depth 24")
      expect(handle.stats[:refusals]).to eq(3)
      # a draining worker is sent nothing more on this connection, whatever its heartbeats say
      w1.heartbeat
      wait_until(message: "the heartbeat read") { handle.receive_results.empty? && handle.stats[:heartbeats] >= 3 }
      expect(handle.workers.find { |w| w["id"] == "w1" }).to include("in_flight" => 0, "capacity" => 10, "drained" => true)
      expect(handle.publish_batch({ "steps" => steps(1, first: 20) })).to eq("w2")
    end
  end

  describe "#stats" do
    it "includes the socket counters" do
      peer = start_peer("w1")
      handle.publish_batch({ "steps" => steps(1) })
      peer.receive_batches(timeout_ms: 5000)
      stats = handle.stats
      expect(stats[:batch_socket][:messages_sent]).to eq(1)
      expect(stats[:result_socket][:messages_received]).to be >= 1
      expect(stats[:heartbeats]).to eq(1)
    end
  end

  describe "#close" do
    it "is idempotent and every later use raises ClosedError" do
      handle.close
      handle.close
      expect(handle.closed?).to be(true)
      expect { handle.receive_results }.to raise_error(TaskerCore::ClosedError)
      expect { handle.publish_batch({ "steps" => steps(1) }) }.to raise_error(TaskerCore::ClosedError)
      expect { handle.workers }.to raise_error(TaskerCore::ClosedError)
    end

    it "frees the endpoints for a new handle" do
      cfg = handle.zeromq_config
      handle.close
      again = described_class.new(batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"])
      expect(again.zeromq_config["batch_endpoint"]).to eq(cfg["batch_endpoint"])
      again.close
    end
  end

  describe "ownership" do
    it "raises ThreadOwnershipError from another thread" do
      handle
      error = Thread.new { handle.receive_results rescue $! }.value # rubocop:disable Style/RescueModifier
      expect(error).to be_a(TaskerCore::ThreadOwnershipError)
    end

    it "raises ForkSafetyError in a forked child, and GC there closes nothing", :spawns, :forks do
      peer = start_peer("w1")
      r, w = IO.pipe
      pid = fork do
        r.close
        begin
          handle.receive_results
          w.write("no error")
        rescue TaskerCore::ForkSafetyError
          w.write("ForkSafetyError")
        end
        handle.close # only forgets the parent's sockets here
        GC.start
        w.close
        exit!(0)
      end
      w.close
      expect(r.read).to eq("ForkSafetyError")
      _, status = Process.wait2(pid)
      expect(status.success?).to be(true)
      r.close
      # The parent's sockets survived the child.
      handle.publish_batch({ "steps" => steps(1) })
      expect(peer.receive_batches(timeout_ms: 5000).size).to eq(1)
    end
  end

  it "survives many handles opened and dropped to the GC" do
    loops.times do
      described_class.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*")
    end
    GC.start
    expect(handle.receive_results).to eq([])
  end
end
