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

  def start(**opts) = @handle.start_orchestration(database_url: db_url, lease_ms: 60_000, poll_interval_ms: 20, **opts)

  # A fresh handle with these OrchestrationHandle.new options.
  def reopen(**opts)
    @handle.close
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                                  heartbeat_timeout_ms: 2000, **opts)
  end

  def connect_peer(capacity: 4, version: 1)
    cfg = @handle.zeromq_config
    @peer = WorkerPeer.new(id: "peer-1", batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"],
                           capacity: capacity, version: version)
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
    # a duplicate of an applied result is counted by the handle and never reaches the database
    @peer.partial(batch, a, output: { "from" => "again" })
    wait_until(message: "a duplicate counted") { @handle.stats[:bad_messages][:duplicate_result] == 1 }
    expect(TaskerCore.task(id)[:steps].first[:output]).to eq("from" => "a")
    expect_counters("claimed" => 2, "dispatched" => 2, "completed" => 2, "stale_results" => 0) { @handle.stats["loop"] }
  end

  # A partial_result whose output (or error) is raw msgpack spliced in as is.
  def partial_with_raw(batch, step, key, raw_value, status:)
    now = Time.now.to_f
    body = { "protocol_version" => 1, "type" => "partial_result", "batch_id" => batch["batch_id"], "worker_id" => "peer-1",
             "step_id" => step["step_id"], "task_id" => step["task_id"], "attempt" => step["attempt"],
             "status" => status, "started_at" => now, "finished_at" => now }
    packed = TaskerCore::Codec.pack(body)
    @peer.raw(["partial_result", (0x80 | (body.size + 1)).chr.b + packed.b[1..] + TaskerCore::Codec.pack(key).b + raw_value.b])
  end

  it "stores outputs and errors as the bytes the worker sent, never re-packed" do
    id = TaskerCore.create_task(name: "pair")
    start
    connect_peer
    batch = next_batch
    a = batch["steps"].first
    # {"n" => 5} with 5 as a uint32 and the key as a str8: msgpack-c would re-pack both shorter
    output = "\x81\xd9\x01n\xce\x00\x00\x00\x05".b
    partial_with_raw(batch, a, "output", output, status: "complete")
    wait_until(message: "a applied") { TaskerCore.task(id)[:steps].first[:state] == "complete" }
    stored = conn.exec("SELECT encode(output, 'hex') AS h FROM tasker_workflow_steps WHERE task_id = $1 AND name = 'a'",
                       [id]).first["h"]
    expect(stored).to eq(output.unpack1("H*"))
    expect(TaskerCore.task(id)[:steps].first[:output]).to eq("n" => 5)

    b = next_batch["steps"].first
    error = TaskerCore::Codec.pack({ "class" => "E", "message" => "m", "backtrace" => [], "retryable" => false,
                                     "retry_after" => nil }).b
    error = "\xde\x00\x05".b + error[1..] # the same map under a map16 header
    partial_with_raw(@peer.batches.last, b, "error", error, status: "error")
    wait_until(message: "the task failed") { TaskerCore.task(id)[:status] == "error" }
    stored = conn.exec("SELECT encode(last_error, 'hex') AS h FROM tasker_workflow_steps WHERE task_id = $1 AND name = 'b'",
                       [id]).first["h"]
    expect(stored).to eq(error.unpack1("H*"))
  end

  it "applies each entry of a version 2 partial_results, storing each output as the bytes it was sent" do
    ids = Array.new(3) { |i| TaskerCore.create_task(name: "pair", context: { "i" => i }) }
    start
    connect_peer(version: 2)
    batch = next_batch
    expect(batch["protocol_version"]).to eq(2)
    steps = batch["steps"]
    expect(steps.size).to eq(3)
    # Entries packed by hand, each output a map msgpack-c would re-pack shorter ({"n" => i}, a uint32
    # under a str8 key), so a stored output that is not the sent bytes shows.
    raw = ->(i) { "\x81\xd9\x01n\xce\x00\x00\x00".b + i.chr.b }
    entries = steps.each_with_index.map do |st, i|
      fields = @peer.entry(st, batch_id: batch["batch_id"]).except("output")
      packed = TaskerCore::Codec.pack(fields)
      (0x80 | (fields.size + 1)).chr.b + packed.b[1..] + TaskerCore::Codec.pack("output").b + raw.call(i + 1)
    end
    body = TaskerCore::Codec.pack({ "protocol_version" => 2, "type" => "partial_results", "worker_id" => "peer-1" }).b
    body = "\x84".b + body[1..] + TaskerCore::Codec.pack("results").b + (0x90 | entries.size).chr.b + entries.join
    @peer.raw(["partial_results", body])
    wait_until(message: "every a applied") do
      ids.all? { |id| TaskerCore.task(id)[:steps].find { |x| x[:name] == "a" }[:state] == "complete" }
    end
    steps.each_with_index do |st, i|
      stored = conn.exec("SELECT encode(output, 'hex') AS h FROM tasker_workflow_steps WHERE id = $1", [st["step_id"]]).first["h"]
      expect(stored).to eq(raw.call(i + 1).unpack1("H*"))
    end
    expect(@handle.stats[:results_received]).to include(partial_results: 1, partial_result: 3)
    expect(@handle.stats[:bad_messages].values.sum).to eq(0)
    # the b steps follow, with a's output as sent
    b = next_batch["steps"]
    expect(b.map { |x| x["dependency_results"]["a"] }).to match_array([{ "n" => 1 }, { "n" => 2 }, { "n" => 3 }])
  end

  it "applies only valid results: bad ones are counted by reason and change nothing" do
    id = TaskerCore.create_task(name: "pair")
    start
    connect_peer
    batch = next_batch
    a = batch["steps"].first
    @peer.send_message("partial_result", "worker_id" => "peer-1", "status" => "complete")
    @peer.send_message("partial_result", "batch_id" => batch["batch_id"], "worker_id" => "peer-1", "task_id" => a["task_id"],
                                         "step_id" => a["step_id"], "attempt" => a["attempt"], "status" => "odd")
    # the handle core parses every result: the loop only gets valid ones
    wait_until(message: "two bad results") { @handle.stats[:bad_messages][:invalid_fields] == 2 }
    @peer.partial(batch, a, output: { "ok" => 1 })
    wait_until(message: "a applied") { TaskerCore.task(id)[:steps].first[:state] == "complete" }
    expect(TaskerCore.task(id)[:steps].first[:output]).to eq("ok" => 1)
    expect(@handle.stats["loop"]).to include("completed" => 1)
    expect(@handle.stats["loop"]).not_to have_key("bad_results")
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

  it "puts the orchestrator's limits in every batch" do
    reopen(max_message_bytes: 1_000_000, max_result_bytes: 500_000)
    TaskerCore.create_task(name: "pair")
    start
    connect_peer
    limits = next_batch["limits"]
    expect(limits).to include("max_result_bytes" => 500_000, "max_message_bytes" => 1_000_000)
    expect(limits["max_payload_depth"]).to be_an(Integer).and be >= 1
  end

  it "splits a claim into batches that each fit max_message_bytes" do
    reopen(max_message_bytes: 64 * 1024)
    ids = Array.new(4) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i, "pad" => "p" * 20_000 }) }
    start
    connect_peer(capacity: 4)
    wait_until(message: "4 steps sent") do
      @peer.receive_batches(timeout_ms: 20)
      @peer.batches.sum { |b| b["steps"].size } == 4
    end
    expect(@peer.batches.size).to be >= 2
    expect(@peer.batches.map { |b| TaskerCore::Codec.pack(b).bytesize }).to all(be < 64 * 1024)
    expect(@peer.batches.flat_map { |b| b["steps"].map { |s| s["task_id"] } }).to match_array(ids)
    expect_counters("batches_split_by_bytes" => be >= 1) { @handle.stats["loop"] }
  end

  it "fails a step whose context nests deeper than any live worker takes, without sending it" do
    id = TaskerCore.create_task(name: "pair")
    deep = 29.times.reduce({ "leaf" => 1 }) { |inner, _| { "k" => inner } } # 30 levels
    conn.exec("UPDATE tasker_tasks SET context = decode($2, 'hex') WHERE id = $1",
              [id, TaskerCore::Codec.pack(deep).unpack1("H*")])
    start
    connect_peer
    wait_until(message: "the task failed") { TaskerCore.task(id)[:status] == "error" }
    step = TaskerCore.task(id)[:steps].find { |s| s[:name] == "a" }
    expect(step[:error]).to include("class" => "TaskerCore::PayloadTooDeepError", "retryable" => false)
    expect(step[:error]["message"]).to match(/context nests 30 levels, over max_payload_depth \d+/)
    expect(@peer.receive_batches(timeout_ms: 100)).to eq([])
    expect_counters("failed_too_deep" => 1, "dispatched" => 0) { @handle.stats["loop"] }
  end

  it "fails a step lost more than max_lost_attempts times with StepLostError" do
    id = TaskerCore.create_task(name: "pair")
    start(max_lost_attempts: 1)
    connect_peer
    2.times do |round|
      next_batch
      @peer.goodbye
      wait_until(message: "loss #{round + 1} counted") do
        loop_stats = @handle.stats["loop"]
        loop_stats["redispatched"] + loop_stats["lost_failed"] == round + 1
      end
      @peer.heartbeat # live again: a goodbye does not disable a worker for good
    end
    wait_until(message: "the task failed") { TaskerCore.task(id)[:status] == "error" }
    expect(TaskerCore.task(id)[:steps].first[:error]).to include("class" => "TaskerCore::StepLostError")
    expect(@handle.stats["loop"]).to include("redispatched" => 1, "lost_failed" => 1)
  end

  describe "with queues" do
    after { @peers&.each(&:close) }

    def steps_of(peer) = peer.batches.flat_map { |b| b["steps"].map { |s| s["step_id"] } }

    def add_queue_peer(id, queues, capacity:)
      cfg = @handle.zeromq_config
      peer = WorkerPeer.new(id: id, batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"],
                            capacity: capacity)
      (@peers ||= []) << peer
      (@queues_of ||= {})[id] = queues
      wait_until(timeout: 10, message: "the orchestrator's subscription") { peer.orchestrator_seen?(timeout_ms: 20) }
      await_q("#{id} live") { @handle.workers.any? { |w| w["id"] == id && w["queues"] == queues } }
      peer
    end

    # Waits, heartbeating every peer with its queues, until the block is true.
    def await_q(message, &block)
      wait_until(timeout: 10, message: message) do
        @peers.each do |p|
          p.heartbeat(queues: @queues_of[p.id])
          p.receive_batches(timeout_ms: 10)
        end
        block.call
      end
    end

    # Two housekeeping rounds begun after now (each writes the worker
    # table, then checks for waiting suspects): one went all through.
    def await_housekeeping
      2.times do
        since = conn.exec("SELECT now() AS t").first["t"]
        await_q("a housekeeping round") do
          conn.exec("SELECT count(*) AS n FROM tasker_workers WHERE updated_at > $1", [since]).first["n"].to_i.positive?
        end
      end
    end

    def draining = @handle.workers.select { |w| w["draining_for_isolation"] }.map { |w| w["id"] }

    it "claims for a worker's other queues while one it serves is at its limit" do
      use_templates(template("one", [step("s")]))
      first = TaskerCore.create_task(name: "one", queue: "partner_api")
      start(poll_interval_ms: 20, queue_limits: { "partner_api" => 1 })
      peer = add_queue_peer("both", %w[default partner_api], capacity: 4)
      await_q("the first partner_api step sent") { steps_of(peer).size == 1 }
      expect(step_row(conn, first, "s")["state"]).to eq("in_progress")

      # An older partner_api backlog (the queue is full), then default work.
      backlog = Array.new(3) { TaskerCore.create_task(name: "one", queue: "partner_api") }
      conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() - interval '60 seconds' " \
                "WHERE task_id = ANY ($1::bigint[])", ["{#{backlog.join(',')}}"])
      fresh = Array.new(3) { TaskerCore.create_task(name: "one") }
      await_q("the default steps sent") { steps_of(peer).size == 4 }
      sent_tasks = peer.batches.flat_map { |b| b["steps"].map { |st| st["task_id"] } }
      expect(sent_tasks).to match_array([first] + fresh)

      # The limit's room back: the oldest of the backlog goes next.
      b = peer.batches.first
      peer.partial(b, b["steps"].first)
      await_q("a partner_api step sent") { steps_of(peer).size == 5 }
      expect(peer.batches.last["steps"].map { |st| st["task_id"] }).to eq([backlog.first])
    end

    it "drains only a worker serving the suspect's queue, and nobody for a queue no worker serves" do
      use_templates(template("one", [step("s")]))
      TaskerCore.create_task(name: "one")
      2.times { TaskerCore.create_task(name: "one", queue: "api") }
      start(poll_interval_ms: 20)
      plain = add_queue_peer("plain", ["default"], capacity: 1)
      api = add_queue_peer("api", ["api"], capacity: 2)
      await_q("both workers full") { steps_of(plain).size == 1 && steps_of(api).size == 2 }

      # A suspect in a queue no worker serves: nobody is drained for it.
      orphan = TaskerCore.create_task(name: "one", queue: "orphan")
      conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE task_id = $1", [orphan])
      await_housekeeping
      expect(draining).to eq([])
      expect(@handle.stats["loop"]["isolation_drains"]).to eq(0)

      # A suspect on api (full, so it waits): the api worker is drained
      # for it, not plain, though plain has less in flight.
      pending = TaskerCore.create_task(name: "one", queue: "api")
      suspect = step_row(conn, pending, "s")["id"]
      conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE id = $1", [suspect])
      await_q("a worker drained") { draining.any? }
      expect(draining).to eq(["api"])
      expect_counters("isolation_drains" => 1) { @handle.stats["loop"] }

      # Once api is idle the suspect goes to it, alone.
      api.batches.each { |b| b["steps"].each { |st| api.partial(b, st) } }
      await_q("the suspect sent") { steps_of(api).include?(suspect) }
      expect(api.batches.last["steps"].map { |st| st["step_id"] }).to eq([suspect])
      expect(steps_of(plain).size).to eq(1)
      expect(step_row(conn, orphan, "s")).to include("state" => "pending", "attempts" => 0)
    end
  end

  describe "a suspect step (lost twice)" do
    after { @peers&.each(&:close) }

    def add_peer(id, capacity: 4)
      cfg = @handle.zeromq_config
      peer = WorkerPeer.new(id: id, batch_endpoint: cfg["batch_endpoint"], result_endpoint: cfg["result_endpoint"],
                            capacity: capacity)
      (@peers ||= []) << peer
      wait_until(timeout: 10, message: "the orchestrator's subscription") { peer.orchestrator_seen?(timeout_ms: 20) }
      wait_until(timeout: 10, message: "#{id} live") do
        peer.heartbeat
        @handle.workers.any? { |w| w["id"] == id }
      end
      peer
    end

    # Waits (heartbeating every peer) until the block is true.
    def await(message, &block)
      wait_until(timeout: 10, message: message) do
        @peers.each do |p|
          p.heartbeat
          p.receive_batches(timeout_ms: 10)
        end
        block.call
      end
    end

    def steps_of(peer) = peer.batches.flat_map { |b| b["steps"].map { |s| s["step_id"] } }

    # The loop went round several more times since now.
    def await_iterations(message)
      seen = @handle.stats["loop"]["loop_iterations"]
      await(message) { @handle.stats["loop"]["loop_iterations"] >= seen + 5 }
    end

    it "is sent alone, only to a worker with nothing in flight, which gets nothing else until it reports" do
      use_templates(template("pair", [step("a"), step("b", ["a"])]), template("one", [step("s")]))
      pair = TaskerCore.create_task(name: "pair")
      suspect = step_row(conn, pair, "b")["id"]
      conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE id = $1", [suspect])
      TaskerCore.create_task(name: "one")
      start(poll_interval_ms: 20)
      busy = add_peer("busy")
      await("a and the other step sent to busy") { steps_of(busy).size == 2 }
      a_batch = busy.batches.find { |b| b["steps"].any? { |s| s["step_name"] == "a" } }
      busy.partial(a_batch, a_batch["steps"].find { |s| s["step_name"] == "a" })

      # b is ready, and busy has room, but something in flight: b is not even claimed.
      await("a applied") { step_row(conn, pair, "a")["state"] == "complete" }
      await_iterations("the loop going round")
      expect(step_row(conn, pair, "b")).to include("state" => "pending", "attempts" => 0)
      expect(steps_of(busy).size).to eq(2)
      expect(@handle.stats["loop"]["isolated"]).to eq(0)

      # A worker with nothing in flight gets it, alone.
      lone = add_peer("lone")
      await("b sent to lone") { lone.batches.any? }
      expect(lone.batches.map { |b| b["steps"].map { |s| s["step_id"] } }).to eq([[suspect]])
      expect_counters("isolated" => 1) { @handle.stats["loop"] }
      expect(@handle.workers.find { |w| w["id"] == "lone" }).to include("isolating" => true, "in_flight" => 1)

      # New work goes to busy (3 free) and waits; none goes to lone meanwhile.
      more = Array.new(5) { TaskerCore.create_task(name: "one") }
      await("busy full") { steps_of(busy).size == 5 }
      await_iterations("the loop going round")
      expect(lone.batches.size).to eq(1)
      expect(steps_of(busy)).not_to include(suspect)

      # b's result frees lone: it takes the rest.
      lone.partial(lone.batches.first, lone.batches.first["steps"].first)
      lone.completion(lone.batches.first)
      await("the rest sent to lone") { steps_of(lone).size == 3 }
      expect(@handle.workers.find { |w| w["id"] == "lone" }).to include("isolating" => false)
      await("the pair complete") { TaskerCore.task(pair)[:status] == "complete" }
      expect(step_row(conn, pair, "b")).to include("attempts" => 1, "lost_attempts" => 2)
      expect(@handle.stats["loop"]["isolated"]).to eq(1)
      expect((steps_of(busy) + steps_of(lone)).uniq.size).to eq(2 + 1 + more.size)
    end

    describe "under a steady backlog that keeps every worker busy" do
      def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

      # One round of two busy workers: each peer answers every step it was
      # sent except the newest one as soon as it has it, and that one too
      # once no batch came for 0.3 s; so a peer empties only when the loop
      # stops giving it work. Steps in @held wait for the spec. While
      # @feeding, new tasks keep arriving: always 8 or more ordinary ones
      # not yet sent.
      def serve
        @peers.each do |p|
          p.heartbeat
          @last_batch_at[p.id] = now if p.receive_batches(timeout_ms: 5).any?
          open = p.batches.flat_map { |b| b["steps"].map { |st| [b, st] } }
                  .reject { |_b, st| @answered.include?(st["step_id"]) || @held.include?(st["step_id"]) }
          open.pop if open.any? && now - @last_batch_at[p.id] < 0.3
          open.each do |b, st|
            p.partial(b, st)
            @answered << st["step_id"]
          end
        end
        sent = @peers.sum { |p| steps_of(p).size }
        @ordinary.concat(Array.new(4) { TaskerCore.create_task(name: "one") }) if @feeding && @ordinary.size + 2 - sent < 8
      end

      def serve_until(message, timeout: 20, &block)
        wait_until(timeout: timeout, message: message) do
          serve
          block.call
        end
      end

      def batches_since(peer, count) = peer.batches.drop(count)

      it "drains one worker for a waiting suspect, sends the suspect to it alone, then gives it work again" do
        use_templates(template("pair", [step("a"), step("b", ["a"])]), template("one", [step("s")]))
        pair = TaskerCore.create_task(name: "pair")
        a = step_row(conn, pair, "a")["id"]
        suspect = step_row(conn, pair, "b")["id"]
        conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE id = $1", [suspect])
        @ordinary = Array.new(8) { TaskerCore.create_task(name: "one") }
        @answered = Set.new
        @held = Set[a, suspect]
        @feeding = true
        @last_batch_at = Hash.new(0)
        start(poll_interval_ms: 20)
        left = add_peer("left")
        right = add_peer("right")

        # Both busy; then a's result makes the suspect ready while neither is idle.
        serve_until("both workers busy") { left.batches.size >= 3 && right.batches.size >= 3 }
        a_peer = @peers.find { |p| steps_of(p).include?(a) }
        a_batch = a_peer.batches.find { |b| b["steps"].any? { |st| st["step_id"] == a } }
        a_peer.partial(a_batch, a_batch["steps"].find { |st| st["step_id"] == a })
        @held.delete(a)
        @answered << a
        serve_until("a applied") { step_row(conn, pair, "a")["state"] == "complete" }
        expect(@handle.stats["loop"]["isolated"]).to eq(0)

        # Within a housekeeping interval one worker is drained; once it is
        # idle the suspect goes to it, alone.
        serve_until("the suspect sent") { @peers.any? { |p| steps_of(p).include?(suspect) } }
        drained, other = @peers.partition { |p| steps_of(p).include?(suspect) }.map(&:first)
        suspect_batch = drained.batches.find { |b| b["steps"].any? { |st| st["step_id"] == suspect } }
        expect(suspect_batch["steps"].map { |st| st["step_id"] }).to eq([suspect])
        expect_counters("isolated" => 1, "isolation_drains" => 1) { @handle.stats["loop"] }
        expect(@handle.workers.find { |w| w["id"] == drained.id })
          .to include("isolating" => true, "draining_for_isolation" => false, "in_flight" => 1)
        # Everything sent to it before was answered: it ran nothing else.
        expect(drained.batches.take_while { |b| !b.equal?(suspect_batch) }.flat_map { |b| b["steps"].map { |st| st["step_id"] } })
          .to all(satisfy { |sid| @answered.include?(sid) })

        # The other worker keeps working meanwhile; the drained one gets nothing else.
        seen = other.batches.size
        after_suspect = drained.batches.size
        serve_until("the other worker fed") { other.batches.size >= seen + 3 }
        expect(drained.batches.size).to eq(after_suspect)

        # The suspect's result: the drained worker takes ordinary work again.
        drained.partial(suspect_batch, suspect_batch["steps"].first)
        @held.delete(suspect)
        @answered << suspect
        serve_until("the drained worker fed again") { drained.batches.size >= after_suspect + 2 }
        expect(batches_since(drained, after_suspect).flat_map { |b| b["steps"].map { |st| st["step_id"] } })
          .not_to include(suspect)
        expect(@handle.workers.find { |w| w["id"] == drained.id }).to include("draining_for_isolation" => false)
        expect(TaskerCore.task(pair)[:status]).to eq("complete")
        expect(step_row(conn, pair, "b")).to include("attempts" => 1, "lost_attempts" => 2)
        expect(@handle.stats["loop"]).to include("isolated" => 1, "isolation_drains" => 1)

        # No more tasks: every ordinary one completes, each step sent once.
        @feeding = false
        serve_until("every ordinary task complete") do
          conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE id = ANY($1::bigint[]) AND state = 'complete'",
                    ["{#{@ordinary.join(',')}}"]).first["n"].to_i == @ordinary.size
        end
        all_sent = @peers.flat_map { |p| steps_of(p) }
        expect(all_sent.size).to eq(all_sent.uniq.size)
        expect(all_sent.size).to eq(@ordinary.size + 2)
      end
    end

    it "stops isolating when its worker is lost, and goes alone again to an idle worker" do
      use_templates(template("one", [step("s")]))
      id = TaskerCore.create_task(name: "one")
      conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE task_id = $1", [id])
      start(poll_interval_ms: 20)
      first = add_peer("first")
      await("sent to first") { first.batches.any? }
      first.goodbye
      await("the loss counted") { step_row(conn, id, "s")["lost_attempts"] == 3 }
      first.heartbeat # live again, and idle: it may take the step again, alone
      await("sent again") { steps_of(first).size == 2 }
      expect(first.batches.map { |b| b["steps"].size }).to eq([1, 1])
      expect_counters("isolated" => 2, "redispatched" => 1) { @handle.stats["loop"] }
    end
  end

  it "fails the steps a worker refuses as too deep, and hands back the ones it refuses while draining (no attempt lost)" do
    ids = Array.new(2) { TaskerCore.create_task(name: "pair") }
    start
    connect_peer
    batch = nil
    wait_until(message: "both steps sent") do
      @peer.receive_batches(timeout_ms: 20)
      batch = @peer.batches.find { |b| b["steps"].size == 2 }
    end
    deep, draining = batch["steps"]
    refused = [[deep, "too_deep", "context nests 30 levels, over max_payload_depth 24"], [draining, "draining", "shutting down"]]
    @peer.send_message("batch_refusal", "batch_id" => batch["batch_id"], "worker_id" => "peer-1", "reason" => "too_deep",
                                        "message" => "refused",
                                        "steps" => refused.map do |s, reason, message|
                                          { "step_id" => s["step_id"], "attempt" => s["attempt"], "reason" => reason, "message" => message }
                                        end)
    wait_until(message: "the refused-as-deep task failed") { TaskerCore.task(deep["task_id"])[:status] == "error" }
    error = TaskerCore.task(deep["task_id"])[:steps].first[:error]
    expect(error).to include("class" => "TaskerCore::PayloadTooDeepError", "retryable" => false, "backtrace" => [])
    expect_counters("failed_refused" => 1, "handed_back_draining" => 1, "redispatched" => 0) { @handle.stats["loop"] }
    step = conn.exec("SELECT state, lost_attempts FROM tasker_workflow_steps WHERE id = $1", [draining["step_id"]]).first
    expect(step).to include("state" => "pending", "lost_attempts" => 0)
    history = conn.exec("SELECT reason FROM tasker_workflow_step_transitions WHERE step_id = $1 ORDER BY id",
                        [draining["step_id"]]).map { |r| r["reason"] }
    expect(history.last).to eq("draining")
    # the draining worker gets nothing more on this connection, whatever its heartbeats say
    @peer.heartbeat
    expect(@peer.receive_batches(timeout_ms: 300)).to be_empty
    expect(@handle.workers.first).to include("drained" => true, "capacity" => 4)
    # on a new connection it is a worker like any other
    @peer.close
    connect_peer
    again = nil
    wait_until(message: "the handed-back step sent again") do
      again = @peer.receive_batches(timeout_ms: 20).flat_map { |b| b["steps"] }.find { |s| s["step_id"] == draining["step_id"] }
    end
    expect(again["attempt"]).to eq(draining["attempt"] + 1)
    expect(ids).to include(deep["task_id"], draining["task_id"])
  end

  it "reads its stats about once a second while the loop runs, so the handle's warnings are logged unasked" do
    log = StringIO.new
    saved = TaskerCore.logger
    TaskerCore.logger = Logger.new(log)
    start
    poller = -> { Thread.list.find { |t| t.name == "tasker-stats" && t.alive? } }
    expect(poller.call).not_to be_nil
    connect_peer
    @peer.send_message("partial_result", "worker_id" => "peer-1", "status" => "complete")
    # nobody here calls #stats: the poller does
    wait_until(timeout: 5, message: "the warning logged") { log.string.include?("invalid_fields") }
    @handle.stop_orchestration
    expect(poller.call).to be_nil
  ensure
    TaskerCore.logger = saved
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
