# frozen_string_literal: true

RSpec.describe TaskerCore::Protocol do
  let(:step) do
    { step_id: 11, task_id: 3, step_name: "validate", handler: "Orders::Validate",
      handler_config: { "strict" => true }, attempt: 1, timeout_ms: 500,
      context: { "order" => 42 }, dependency_results: { "fetch" => { "ok" => true } } }
  end
  let(:batch) { described_class.batch(batch_id: "b-1", worker_id: "w-1", steps: [step]) }
  let(:partial) do
    described_class.partial_result(batch_id: "b-1", worker_id: "w-1", step_id: 11, task_id: 3, attempt: 1,
                                   output: { "valid" => true }, started_at: 100.0, finished_at: 100.25)
  end

  def expect_invalid(msg, reason, field = nil)
    expect { described_class.validate!(msg) }.to raise_error(TaskerCore::Protocol::MessageError) { |e|
      expect(e).to be_a(TaskerCore::ProtocolError)
      expect(e.reason).to eq(reason)
      if field
        expect(e.field).to eq(field)
        expect(e.message).to include(field)
      end
    }
  end

  it "builds every message type as a valid version 2 message with string keys" do
    entry = described_class.result_entry(batch_id: "b-1", step_id: 12, task_id: 3, attempt: 1, output: { "ok" => true },
                                         started_at: 1.0, finished_at: 2.0)
    messages = [
      described_class.partial_results(worker_id: "w-1", results: [entry, entry.merge("step_id" => 13)]),
      batch, partial,
      described_class.partial_result(batch_id: "b-1", worker_id: "w-1", step_id: 11, task_id: 3, attempt: 2,
                                     error: described_class.error_object(klass: "X", message: "m", retryable: true),
                                     started_at: 1.0, finished_at: 2.0),
      described_class.batch_completion(batch_id: "b-1", worker_id: "w-1", steps: [{ step_id: 11, attempt: 1, status: "complete" }]),
      described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 1),
      described_class.goodbye(worker_id: "w-1", reason: "shutdown"),
      described_class.batch_refusal(batch_id: "b-1", worker_id: "w-1", reason: "too_deep", message: "m",
                                    steps: [{ step_id: 11, attempt: 1, reason: "too_deep", message: "context nests 30 levels" }])
    ]
    messages.each do |m|
      expect(described_class.validate!(m)).to equal(m)
      expect(m.keys).to all(be_a(String))
      expect(m["protocol_version"]).to eq(2)
    end
    expect(messages.map { |m| m["type"] }.uniq).to match_array(described_class::TYPES)
  end

  it "adds a heartbeat's optional connection field and validates it when present" do
    hb = described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 0,
                                   connection: { connects: 2, disconnects: 1, last_event: :connected,
                                                 last_event_at: Time.at(1_732_300_000) })
    expect(hb["connection"]).to eq("connects" => 2, "disconnects" => 1, "last_event" => "connected",
                                   "last_event_at" => 1_732_300_000.0)
    expect(described_class.validate!(hb)).to equal(hb)
    expect(described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 0)).not_to have_key("connection")
    quiet = described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 0,
                                      connection: { "connects" => 0, "disconnects" => 0, "last_event" => nil,
                                                    "last_event_at" => nil })
    expect(described_class.validate!(quiet)).to equal(quiet)

    bad = hb.merge("connection" => hb["connection"].merge("connects" => -1))
    expect { described_class.validate!(bad) }.to raise_error(TaskerCore::Protocol::MessageError) { |e|
      expect(e.field).to eq("connection.connects")
    }
    expect { described_class.validate!(hb.merge("connection" => "up")) }
      .to raise_error(TaskerCore::Protocol::MessageError) { |e| expect(e.field).to eq("connection") }
  end

  it "carries a batch's optional limits, and reads them leniently for a worker" do
    limited = described_class.batch(batch_id: "b-1", worker_id: "w-1", steps: [step],
                                    limits: { max_result_bytes: 0, max_message_bytes: 1024, max_payload_depth: 24 })
    expect(limited["limits"]).to eq("max_result_bytes" => 0, "max_message_bytes" => 1024, "max_payload_depth" => 24)
    expect(described_class.validate!(limited)).to equal(limited)
    expect(described_class.batch_limits(limited)).to eq(max_result_bytes: 0, max_message_bytes: 1024, max_payload_depth: 24)
    expect(described_class.batch_limits(batch)).to eq({})

    odd = limited.merge("limits" => { "max_result_bytes" => -1, "max_message_bytes" => "big", "max_payload_depth" => 8 })
    expect_invalid(odd, :invalid_field, "limits.max_result_bytes")
    # A worker decodes leniently: a mistyped limit is left out, not the batch.
    decoded = described_class.decode([described_class.batch_topic("w-1"), TaskerCore::Codec.pack(odd)], strict_batch: false)
    expect(described_class.batch_limits(decoded)).to eq(max_payload_depth: 8)
  end

  it "adds a heartbeat's optional limits and in-flight list and validates them when present" do
    hb = described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 2,
                                   limits: { max_batch_steps: 2, max_message_bytes: 4096, max_payload_depth: 24 },
                                   last_batch_id: "b-9", in_flight_steps: [[11, 1], [12, 3]])
    expect(hb).to include("limits" => { "max_batch_steps" => 2, "max_message_bytes" => 4096, "max_payload_depth" => 24 },
                          "last_batch_id" => "b-9", "in_flight_steps" => [[11, 1], [12, 3]])
    expect(described_class.validate!(hb)).to equal(hb)
    fresh = described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 0, last_batch_id: nil, in_flight_steps: [])
    expect(fresh).to include("last_batch_id" => nil, "in_flight_steps" => [])
    expect(described_class.validate!(fresh)).to equal(fresh)
    expect(described_class.heartbeat(worker_id: "w-1", capacity: 4, in_flight: 0).keys)
      .not_to include("limits", "last_batch_id", "in_flight_steps")

    expect_invalid(hb.merge("limits" => hb["limits"].merge("max_batch_steps" => 0)), :invalid_field, "limits.max_batch_steps")
    expect_invalid(hb.merge("in_flight_steps" => [[11, 0]]), :invalid_field, "in_flight_steps")
    expect_invalid(hb.except("in_flight_steps"), :invalid_field, "in_flight_steps")
    expect_invalid(hb.except("last_batch_id"), :invalid_field, "last_batch_id")
  end

  it "validates a batch_refusal and its steps" do
    whole = described_class.batch_refusal(batch_id: nil, worker_id: "w-1", reason: "undecodable", message: "bad msgpack")
    expect(whole).to include("batch_id" => nil, "steps" => [])
    expect(described_class.encode(whole).first).to eq("batch_refusal")
    expect(described_class.decode(described_class.encode(whole))).to eq(whole)
    one = described_class.batch_refusal(batch_id: "b-1", worker_id: "w-1", reason: "invalid_step", message: "m",
                                        steps: [{ step_id: 1, attempt: 1, reason: "invalid_step", message: "m" }])
    expect_invalid(one.merge("steps" => [one["steps"][0].merge("attempt" => 0)]), :invalid_field, "steps[0].attempt")
    expect_invalid(one.merge("reason" => ""), :invalid_field, "reason")
    expect_invalid(one.except("steps"), :invalid_field, "steps")
  end

  it "checks one step map at a time" do
    expect(described_class.step_problem(batch["steps"][0], 0)).to be_nil
    problem = described_class.step_problem(batch["steps"][0].merge("context" => []), 3)
    expect(problem).to be_a(TaskerCore::Protocol::MessageError)
    expect(problem.field).to eq("steps[3].context")
    expect(described_class.step_problem(42, 1).field).to eq("steps[1]")
    loose = batch.merge("steps" => [{ "step_id" => 1 }])
    expect(described_class.decode([described_class.batch_topic("w-1"), TaskerCore::Codec.pack(loose)], strict_batch: false))
      .to eq(loose)
  end

  it "finds the batch_id of a body the decoder refuses" do
    pack = ->(v) { TaskerCore::Codec.pack(v) }
    too_deep = ("\x91".b * 40) + "\x01".b
    body = "\x83".b + pack.call("type") + pack.call("batch") + pack.call("steps") + too_deep +
           pack.call("batch_id") + pack.call("b-77")
    expect { TaskerCore::Codec.unpack(body) }.to raise_error(TaskerCore::ProtocolError)
    expect(described_class.peek_batch_id(body)).to eq("b-77")
    expect(described_class.peek_batch_id(pack.call(batch))).to eq("b-1")
    expect(described_class.peek_batch_id("\xC1 garbage".b)).to be_nil
    expect(described_class.peek_batch_id("\x82".b + pack.call("steps") + "\xDF\xFF\xFF\xFF\xFF".b)).to be_nil
    expect(described_class.peek_batch_id(pack.call({ "batch_id" => 7 }))).to be_nil
    expect(described_class.peek_batch_id(pack.call([1, 2]))).to be_nil
  end

  it "derives status and duration in a partial result" do
    expect(partial).to include("status" => "complete", "error" => nil, "duration_ms" => 250.0)
  end

  it "addresses batches to one worker's topic and results to their type" do
    expect(described_class.encode(batch).first).to eq("batch.w-1.")
    expect(described_class.encode(partial).first).to eq("partial_result")
  end

  it "round-trips through the codec, checking the topic" do
    expect(described_class.decode(described_class.encode(batch))).to eq(batch)
    topic, body = described_class.encode(batch)
    expect { described_class.decode(["batch.w-2.", body]) }
      .to raise_error(TaskerCore::Protocol::MessageError) { |e| expect(e.reason).to eq(:topic_mismatch) }
    expect(topic).to eq("batch.w-1.")
  end

  it "classifies bad frames and bodies by reason" do
    { [] => :malformed_frames, %w[a b c] => :malformed_frames, ["batch.w-1.", "\xC1".b] => :undecodable,
      ["batch.w-1.", TaskerCore::Codec.pack([1, 2])] => :not_a_map }.each do |frames, reason|
      expect { described_class.decode(frames) }
        .to raise_error(TaskerCore::Protocol::MessageError) { |e| expect(e.reason).to eq(reason) }
    end
  end

  it "rejects a wrong or missing protocol_version" do
    expect_invalid(batch.merge("protocol_version" => 3), :wrong_version, "protocol_version")
    expect_invalid(batch.merge("protocol_version" => 0), :wrong_version, "protocol_version")
    expect_invalid(batch.except("protocol_version"), :wrong_version, "protocol_version")
  end

  it "accepts version 1 messages as before, without version 2's rules" do
    v1 = batch.merge("protocol_version" => 1)
    expect(described_class.validate!(v1)).to equal(v1)
    int_keys = partial.merge("protocol_version" => 1, "output" => { 1 => "one", "rows" => [{ 2 => nil }] })
    expect(described_class.validate!(int_keys)).to equal(int_keys)
    expect_invalid(int_keys.merge("protocol_version" => 2), :invalid_field, "output.1")
    expect_invalid(partial.merge("output" => { "rows" => [{ "a" => { 7 => 1 } }] }), :invalid_field, "output.rows[0].a.7")
    # partial_results exists from version 2 on
    entry = partial.except("protocol_version", "type", "worker_id")
    v2 = described_class.partial_results(worker_id: "w-1", results: [entry])
    expect(described_class.validate!(v2)).to equal(v2)
    expect_invalid(v2.merge("protocol_version" => 1), :unknown_type, "type")
  end

  it "checks each entry of a partial_results as a partial_result" do
    entry = partial.except("protocol_version", "type", "worker_id")
    msg = ->(*entries) { described_class.partial_results(worker_id: "w-1", results: entries) }
    expect_invalid(msg.call, :invalid_field, "results")
    expect_invalid(msg.call(entry, entry.except("attempt")), :invalid_field, "results[1].attempt")
    expect_invalid(msg.call(entry.merge("status" => "error")), :invalid_field, "results[0].error")
    expect_invalid(msg.call(entry.merge("output" => { 1 => 2 })), :invalid_field, "results[0].output.1")
  end

  it "splices packed entries into one partial_result or one partial_results without re-encoding them" do
    entries = (1..3).map do |i|
      described_class.result_entry(batch_id: "b-1", step_id: i, task_id: 1, attempt: 1, output: { "i" => i, k: [i] },
                                   started_at: 1.0, finished_at: 2.0)
    end
    packed = entries.map { |e| described_class.pack_entry(e) }
    topic, body = described_class.result_frames("w-1", packed.first(1))
    one = described_class.decode([topic, body])
    expect(one).to eq(described_class.partial_result(batch_id: "b-1", worker_id: "w-1", step_id: 1, task_id: 1,
                                                     attempt: 1, output: { "i" => 1, "k" => [1] },
                                                     started_at: 1.0, finished_at: 2.0))
    many = described_class.decode(described_class.result_frames("w-1", packed))
    expect(many).to include("type" => "partial_results", "protocol_version" => 2, "worker_id" => "w-1")
    expect(many["results"].map { |r| r["step_id"] }).to eq([1, 2, 3])
    expect(many["results"][2]["output"]).to eq("i" => 3, "k" => [3])
    # more than 15 entries take an array16 header
    big = described_class.decode(described_class.result_frames("w-1", packed * 6))
    expect(big["results"].size).to eq(18)
    expect { described_class.pack_entry(entries[0].merge("output" => { 1 => 2 })) }
      .to raise_error(TaskerCore::Protocol::MessageError, /output\.1/)
  end

  it "rejects an unknown type" do
    expect_invalid(batch.merge("type" => "hello"), :unknown_type, "type")
  end

  it "names the missing or malformed field, nested ones included" do
    expect_invalid(batch.except("batch_id"), :invalid_field, "batch_id")
    expect_invalid(batch.merge("worker_id" => "a.b"), :invalid_field, "worker_id")
    bad_step = batch["steps"][0].merge("attempt" => 0)
    expect_invalid(batch.merge("steps" => [batch["steps"][0], bad_step]), :invalid_field, "steps[1].attempt")
    expect_invalid(batch.merge("steps" => [batch["steps"][0].except("handler")]), :invalid_field, "steps[0].handler")
    expect_invalid(partial.merge("status" => "done"), :invalid_field, "status")
    expect_invalid(partial.merge("output" => 42), :invalid_field, "output")
  end

  it "requires an error object exactly when a partial failed" do
    expect_invalid(partial.merge("status" => "error"), :invalid_field, "error")
    err = described_class.error_object(klass: "E", message: "m", retryable: true)
    expect_invalid(partial.merge("error" => err), :invalid_field, "error")
    failed = partial.merge("status" => "error", "output" => nil, "error" => err.merge("retryable" => "yes"))
    expect_invalid(failed, :invalid_field, "error.retryable")
  end

  it "accepts fields it does not know (additions within a version)" do
    expect(described_class.validate!(batch.merge("priority" => 5))).to be_truthy
  end

  describe ".error_from_exception" do
    def raised(error)
      raise error
    rescue StandardError => e
      described_class.error_from_exception(e)
    end

    it "classifies retryable, permanent, unknown-handler and other errors" do
      expect(raised(TaskerCore::RetryableError.new("busy", retry_after: 2)))
        .to include("class" => "TaskerCore::RetryableError", "retryable" => true, "retry_after" => 2.0)
      expect(raised(TaskerCore::PermanentError.new("no"))).to include("retryable" => false, "retry_after" => nil)
      expect(raised(TaskerCore::UnknownHandlerError.new("?"))).to include("retryable" => false)
      expect(raised(ZeroDivisionError.new("x"))).to include("class" => "ZeroDivisionError", "retryable" => true)
    end

    it "trims the backtrace" do
      error = RuntimeError.new("deep")
      error.set_backtrace(Array.new(100) { |i| "line #{i}" })
      expect(described_class.error_from_exception(error)["backtrace"].size).to eq(described_class::BACKTRACE_LINES)
    end
  end
end
