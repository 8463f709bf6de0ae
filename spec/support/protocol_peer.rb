# frozen_string_literal: true

# A stand-in orchestrator for worker specs, made of real sockets speaking
# the wire protocol (version 2 unless a batch says 1): an XPUB bound for
# batches, a SUB bound for results. It decodes every result with
# TaskerCore::Protocol.decode, so a worker that sends a malformed message
# fails the spec right there. A partial_results is recorded in #raw as
# sent and in #messages as the partial_result of each entry, as the
# orchestrator applies it.
#
# All methods must be called from the thread that made the peer (libzmq
# sockets belong to one thread).
class ProtocolPeer
  Protocol = TaskerCore::Protocol

  attr_reader :batch_endpoint, :result_endpoint, :messages, :raw, :batch_subscriptions

  # curve_secret_key: makes both sockets CURVE servers that allow
  # allowed_client_keys (Z85 public keys).
  def initialize(curve_secret_key: nil, allowed_client_keys: [])
    security = {}
    security[:curve_server] = { secret_key: curve_secret_key, allowed_client_keys: allowed_client_keys } if curve_secret_key
    @batches = TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*", send_hwm: 10_000, **security)
    @results = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*", topics: [""], recv_hwm: 100_000, **security)
    @batch_endpoint = @batches.last_endpoint
    @result_endpoint = @results.last_endpoint
    @messages = []
    @raw = []
    @batch_subscriptions = []
    @next_batch = 0
  end

  def close
    @batches.close
    @results.close
  end

  # Receives whatever is ready (waiting up to timeout_ms for the first
  # message) and records it; returns the new messages.
  def poll(timeout_ms: 50)
    @batch_subscriptions.concat(@batches.subscriptions(timeout_ms: 0))
    raw = @results.receive_many(max: 1000, timeout_ms: timeout_ms).map { |frames| Protocol.decode(frames) }
    @raw.concat(raw)
    fresh = raw.flat_map { |m| m["type"] == Protocol::PARTIAL_RESULTS ? expand(m) : [m] }
    @messages.concat(fresh)
    fresh
  end

  # The partial_result each entry of a partial_results stands for.
  def expand(msg)
    envelope = msg.slice("protocol_version", "worker_id").merge("type" => Protocol::PARTIAL_RESULT)
    msg["results"].map { |entry| envelope.merge(entry) }
  end

  # Polls until the block, given every message so far, returns truthy.
  def wait_for(description = "messages", timeout: 15)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      result = yield @messages
      return result if result
      raise "timed out waiting for #{description}; got #{@messages.map { |m| m['type'] }.tally}" if
        Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      poll
    end
  end

  # Live as the orchestrator sees it: its batch subscription and a heartbeat.
  def wait_for_worker(worker_id)
    topic = Protocol.batch_topic(worker_id)
    wait_for("worker #{worker_id} to subscribe and heartbeat") do |msgs|
      @batch_subscriptions.include?([:subscribe, topic]) &&
        msgs.any? { |m| m["type"] == "heartbeat" && m["worker_id"] == worker_id }
    end
  end

  def send_batch(worker_id, steps, batch_id: "b-#{@next_batch += 1}", limits: nil, version: Protocol::VERSION)
    msg = Protocol.batch(batch_id: batch_id, worker_id: worker_id, steps: steps, limits: limits, version: version)
    raise "batch refused at the high-water mark" unless @batches.send_parts(Protocol.encode(msg))

    batch_id
  end

  # {allowed:, denied:} CURVE handshakes over both sockets (a CURVE peer).
  def handshakes
    [@batches, @results].map(&:handshakes).inject { |a, b| a.merge(b) { |_k, x, y| x + y } }
  end

  def send_raw(frames)
    @batches.send_parts(frames)
  end

  def of_type(type, batch_id: nil)
    @messages.select { |m| m["type"] == type && (batch_id.nil? || m["batch_id"] == batch_id) }
  end

  def partials(batch_id = nil)
    of_type("partial_result", batch_id: batch_id)
  end

  def completions(batch_id = nil)
    of_type("batch_completion", batch_id: batch_id)
  end

  def heartbeats
    of_type("heartbeat")
  end
end

module HeldResults
  # For worker specs that hold a worker's results: results is a bound
  # Subscriber with no subscription yet, so the worker keeps every result.
  # Subscribes now and returns the messages that arrive (decoded, validated)
  # until one of each of until_types has come (by default, up to and
  # including the first batch_completion).
  def release_held_results(results, until_types: %w[batch_completion])
    results.subscribe("")
    got = []
    wait_until(message: "the held results (#{until_types.join(', ')})") do
      results.receive_many(timeout_ms: 50).each { |f| got << TaskerCore::Protocol.decode(f) }
      until_types.all? { |t| got.any? { |m| m["type"] == t } }
    end
    got
  end
end

RSpec.configure { |c| c.include HeldResults }
