# frozen_string_literal: true

require "socket"

# A small worker that speaks the wire protocol (version 1 unless given
# version: 2) over real sockets, for specs of the orchestrator side: it subscribes to its batch topic, heartbeats,
# collects the batches it is sent and answers with whatever the spec says.
# It does not run handlers; the real executor lives in lib/tasker_core/worker.
class WorkerPeer
  attr_reader :id, :batches, :version

  def initialize(id:, batch_endpoint:, result_endpoint:, capacity: 4, version: 1)
    @id = id
    @version = version
    @capacity = capacity
    @batches = []
    @sub = TaskerCore::Socket::Subscriber.new(connect: batch_endpoint, topics: ["batch.#{id}."])
    @pub = TaskerCore::Socket::Publisher.new(connect: result_endpoint)
    @orchestrator_seen = false
  end

  # True once the orchestrator's catch-all subscription reached our
  # publisher: anything sent before that would be dropped by the XPUB.
  # The orchestrator's SUB must be polled meanwhile (the caller does it:
  # a bound SUB sends its subscription only when its thread touches it).
  def orchestrator_seen?(timeout_ms: 0)
    @orchestrator_seen ||= @pub.subscriptions(timeout_ms: timeout_ms).any? { |kind, topic| kind == :subscribe && topic == "" }
  end

  # connection, limits, last_batch_id, in_flight_steps: optional fields as
  # given (any value), left out when omitted.
  def heartbeat(capacity: @capacity, in_flight: 0, **opt)
    fields = { "worker_id" => @id, "pid" => Process.pid, "host" => Socket.gethostname,
               "capacity" => capacity, "in_flight" => in_flight, "sent_at" => Time.now.to_f }
    %i[connection limits last_batch_id in_flight_steps queues].each { |k| fields[k.to_s] = opt[k] if opt.key?(k) }
    send_message("heartbeat", fields)
  end

  # A batch_refusal (docs/protocol.md 4.7); steps: [[step_id, attempt, reason, message], ...].
  def refusal(batch_id, reason:, message: "refused", steps: [])
    send_message("batch_refusal", "batch_id" => batch_id, "worker_id" => @id, "reason" => reason, "message" => message,
                                  "steps" => steps.map { |sid, att, r, m| { "step_id" => sid, "attempt" => att, "reason" => r, "message" => m } })
  end

  def goodbye(reason = "shutdown")
    send_message("goodbye", "worker_id" => @id, "reason" => reason)
  end

  # Reads the batches waiting for us (decoded), keeps them in #batches and
  # returns the new ones.
  def receive_batches(timeout_ms: 0)
    got = @sub.receive_many(timeout_ms: timeout_ms).map do |topic, body|
      raise "batch on #{topic.inspect}, expected batch.#{@id}." unless topic == "batch.#{@id}."

      TaskerCore::Codec.unpack(body)
    end
    @batches.concat(got)
    got
  end

  def partial(batch, step, status: "complete", output: { "ok" => true }, attempt: step["attempt"],
              batch_id: batch["batch_id"], worker_id: @id, topic: "partial_result")
    body = { "protocol_version" => @version, "type" => "partial_result", "worker_id" => worker_id,
             **entry(step, status: status, output: output, attempt: attempt, batch_id: batch_id) }
    raw([topic, TaskerCore::Codec.pack(body)])
  end

  # One result entry (docs/protocol.md 4.3) for step of batch_id.
  def entry(step, batch_id:, status: "complete", output: { "ok" => true }, attempt: step["attempt"])
    now = Time.now.to_f
    { "batch_id" => batch_id, "step_id" => step["step_id"], "task_id" => step["task_id"], "attempt" => attempt,
      "status" => status, "output" => output, "error" => nil, "started_at" => now, "finished_at" => now,
      "duration_ms" => 0.0 }
  end

  # A version 2 partial_results carrying entries (see #entry) as given.
  def partials(entries, version: 2)
    raw(["partial_results", TaskerCore::Codec.pack({ "protocol_version" => version, "type" => "partial_results",
                                                     "worker_id" => @id, "results" => entries })])
  end

  def completion(batch)
    send_message("batch_completion", "batch_id" => batch["batch_id"], "worker_id" => @id, "completed_at" => Time.now.to_f,
                                     "steps" => batch["steps"].map { |s| { "step_id" => s["step_id"], "attempt" => s["attempt"], "status" => "complete" } })
  end

  def send_message(type, fields)
    raw([type, TaskerCore::Codec.pack({ "protocol_version" => @version, "type" => type }.merge(fields))])
  end

  # Any frames at all, for bad-input specs.
  def raw(frames)
    @pub.send_parts(frames) or raise "result publisher refused a message at its high-water mark"
  end

  def unsubscribe
    @sub.unsubscribe("batch.#{@id}.")
  end

  def close
    @sub.close
    @pub.close
  end
end

# Script for a peer in a child process (args: id batch_endpoint
# result_endpoint capacity): connects, heartbeats every 50 ms until killed,
# prints "ready" and then "batch <batch_id> <steps>" for each batch it gets.
WORKER_PEER_SCRIPT = <<~RUBY
  require "tasker_core"
  require #{File.expand_path(__FILE__).dump}
  id, batch_ep, result_ep, capacity = ARGV
  $stdout.sync = true
  peer = WorkerPeer.new(id: id, batch_endpoint: batch_ep, result_endpoint: result_ep, capacity: Integer(capacity))
  nil until peer.orchestrator_seen?(timeout_ms: 50)
  puts "ready"
  loop do
    peer.heartbeat
    peer.receive_batches(timeout_ms: 50).each { |b| puts "batch \#{b["batch_id"]} \#{b["steps"].size}" }
  end
RUBY
