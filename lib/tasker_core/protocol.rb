# frozen_string_literal: true

require "socket"

module TaskerCore
  # Wire protocol between the orchestrator and workers (docs/protocol.md):
  # version 2, and version 1 as older peers speak it.
  #
  # Every message either side sends is built and checked here, so the two
  # sides cannot drift apart on a topic, a field name or an error shape
  # (the failure that sank an earlier attempt at this design).
  module Protocol
    # The version this side sends; VERSIONS are the ones it accepts.
    VERSION = 2
    VERSIONS = [1, 2].freeze

    BATCH = "batch"
    PARTIAL_RESULT = "partial_result"
    BATCH_COMPLETION = "batch_completion"
    HEARTBEAT = "heartbeat"
    GOODBYE = "goodbye"
    BATCH_REFUSAL = "batch_refusal"
    # Version 2: the results of several steps in one message.
    PARTIAL_RESULTS = "partial_results"
    TYPES = [BATCH, PARTIAL_RESULT, BATCH_COMPLETION, HEARTBEAT, GOODBYE, BATCH_REFUSAL, PARTIAL_RESULTS].freeze
    # Types a worker publishes on the result channel; their topic frame is the type.
    RESULT_TYPES = [PARTIAL_RESULT, BATCH_COMPLETION, HEARTBEAT, GOODBYE, BATCH_REFUSAL, PARTIAL_RESULTS].freeze
    # Types that exist from version 2 on.
    V2_TYPES = [PARTIAL_RESULTS].freeze
    # The envelope of a partial_result; the rest of its fields make an entry
    # of partial_results (docs/protocol.md 4.3).
    ENVELOPE_KEYS = %w[protocol_version type worker_id].freeze

    # Reasons of a batch_refusal (docs/protocol.md 4.7).
    REFUSAL_REASONS = %w[too_many_steps undecodable draining too_deep invalid_step unknown_handler].freeze

    STATUS_COMPLETE = "complete"
    STATUS_ERROR = "error"
    STATUSES = [STATUS_COMPLETE, STATUS_ERROR].freeze

    # Subscriber topics are byte prefixes, so ids are restricted and the
    # topic ends in "." to keep worker "a" from receiving worker "ab"'s batches.
    WORKER_ID_PATTERN = /\A[A-Za-z0-9_-]+\z/.freeze
    BATCH_TOPIC_PREFIX = "batch."
    BACKTRACE_LINES = 20

    # A message that breaks this protocol. #reason is a Symbol a receiver can
    # count by (:malformed_frames, :undecodable, :not_a_map, :wrong_version,
    # :unknown_type, :invalid_field, :topic_mismatch); #field names the
    # offending field when there is one ("steps[2].attempt").
    class MessageError < TaskerCore::ProtocolError
      attr_reader :reason, :field

      def initialize(message, reason:, field: nil)
        super(message)
        @reason = reason
        @field = field
      end
    end

    # Field checks per message type: [name, check, description]. Receivers
    # ignore fields not listed (docs/protocol.md, "Versioning").
    INT = ->(v) { v.is_a?(Integer) }
    NON_NEG_INT = ->(v) { v.is_a?(Integer) && v >= 0 }
    POS_INT = ->(v) { v.is_a?(Integer) && v >= 1 }
    STR = ->(v) { v.is_a?(String) && !v.empty? }
    ANY_STR = ->(v) { v.is_a?(String) }
    NUM = ->(v) { v.is_a?(Numeric) && !(v.is_a?(Float) && (v.nan? || v.infinite?)) }
    NUM_OR_NIL = ->(v) { v.nil? || NUM.call(v) }
    MAP = ->(v) { v.is_a?(Hash) }
    MAP_OR_NIL = ->(v) { v.nil? || v.is_a?(Hash) }
    BOOL = ->(v) { v == true || v == false }
    WORKER_ID = ->(v) { v.is_a?(String) && WORKER_ID_PATTERN.match?(v) }
    STATUS = ->(v) { STATUSES.include?(v) }
    STR_ARRAY = ->(v) { v.is_a?(Array) && v.all?(String) }
    TIMEOUT = ->(v) { v.nil? || NON_NEG_INT.call(v) }

    STEP_FIELDS = [
      ["step_id", INT, "an Integer"],
      ["task_id", INT, "an Integer"],
      ["step_name", STR, "a non-empty String"],
      ["handler", STR, "a non-empty String"],
      ["handler_config", MAP, "a map"],
      ["attempt", POS_INT, "an Integer >= 1"],
      ["timeout_ms", TIMEOUT, "an Integer >= 0 or nil"],
      ["context", MAP, "a map"],
      ["dependency_results", MAP, "a map"]
    ].freeze

    ERROR_FIELDS = [
      ["class", STR, "a non-empty String"],
      ["message", ANY_STR, "a String"],
      ["backtrace", STR_ARRAY, "an Array of Strings"],
      ["retryable", BOOL, "true or false"],
      ["retry_after", NUM_OR_NIL, "a Float (seconds) or nil"]
    ].freeze

    # A heartbeat's optional "connection" (the worker's socket monitor totals).
    CONNECTION_FIELDS = [
      ["connects", NON_NEG_INT, "an Integer >= 0"],
      ["disconnects", NON_NEG_INT, "an Integer >= 0"],
      ["last_event", ->(v) { v.nil? || v.is_a?(String) }, "a String or nil"],
      ["last_event_at", NUM_OR_NIL, "a Float (epoch seconds) or nil"]
    ].freeze

    # A batch's optional "limits" (the orchestrator's) and a heartbeat's
    # optional "limits" (the worker's).
    COMMON_LIMIT_FIELDS = [
      ["max_message_bytes", POS_INT, "an Integer >= 1"],
      ["max_payload_depth", POS_INT, "an Integer >= 1"]
    ].freeze
    BATCH_LIMIT_FIELDS = [["max_result_bytes", NON_NEG_INT, "an Integer >= 0"], *COMMON_LIMIT_FIELDS].freeze
    WORKER_LIMIT_FIELDS = [["max_batch_steps", POS_INT, "an Integer >= 1"], *COMMON_LIMIT_FIELDS].freeze
    STEP_REF = ->(v) { v.is_a?(Array) && v.size == 2 && INT.call(v[0]) && POS_INT.call(v[1]) }

    REFUSAL_STEP_FIELDS = [
      ["step_id", INT, "an Integer"],
      ["attempt", POS_INT, "an Integer >= 1"],
      ["reason", STR, "a non-empty String"],
      ["message", ANY_STR, "a String"]
    ].freeze

    COMPLETION_STEP_FIELDS = [
      ["step_id", INT, "an Integer"],
      ["attempt", POS_INT, "an Integer >= 1"],
      ["status", STATUS, "\"complete\" or \"error\""]
    ].freeze

    FIELDS = {
      BATCH => [
        ["batch_id", STR, "a non-empty String"],
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["sent_at", NUM, "a Float (epoch seconds)"],
        ["steps", ->(v) { v.is_a?(Array) }, "an Array"]
      ],
      PARTIAL_RESULT => [
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["batch_id", STR, "a non-empty String"],
        ["step_id", INT, "an Integer"],
        ["task_id", INT, "an Integer"],
        ["attempt", POS_INT, "an Integer >= 1"],
        ["status", STATUS, "\"complete\" or \"error\""],
        ["output", MAP_OR_NIL, "a map or nil"],
        ["error", MAP_OR_NIL, "a map or nil"],
        ["started_at", NUM, "a Float (epoch seconds)"],
        ["finished_at", NUM, "a Float (epoch seconds)"],
        ["duration_ms", NUM, "a Float (milliseconds)"]
      ],
      PARTIAL_RESULTS => [
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["results", ->(v) { v.is_a?(Array) && !v.empty? }, "a non-empty Array"]
      ],
      BATCH_COMPLETION => [
        ["batch_id", STR, "a non-empty String"],
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["completed_at", NUM, "a Float (epoch seconds)"],
        ["steps", ->(v) { v.is_a?(Array) }, "an Array"]
      ],
      HEARTBEAT => [
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["pid", INT, "an Integer"],
        ["host", ANY_STR, "a String"],
        ["capacity", NON_NEG_INT, "an Integer >= 0"],
        ["in_flight", NON_NEG_INT, "an Integer >= 0"],
        ["sent_at", NUM, "a Float (epoch seconds)"]
      ],
      GOODBYE => [
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["reason", ANY_STR, "a String"]
      ],
      BATCH_REFUSAL => [
        ["batch_id", ->(v) { v.nil? || STR.call(v) }, "a non-empty String or nil"],
        ["worker_id", WORKER_ID, "a worker id matching #{WORKER_ID_PATTERN.source}"],
        ["reason", STR, "a non-empty String"],
        ["message", ANY_STR, "a String"],
        ["steps", ->(v) { v.is_a?(Array) }, "an Array"]
      ]
    }.freeze
    # An entry of partial_results: a partial_result without its envelope.
    RESULT_ENTRY_FIELDS = FIELDS[PARTIAL_RESULT].drop(1).freeze

    module_function

    def batch_topic(worker_id)
      "#{BATCH_TOPIC_PREFIX}#{worker_id}."
    end

    # The topic frame a message travels under.
    def topic_for(msg)
      msg["type"] == BATCH ? batch_topic(msg["worker_id"]) : msg["type"]
    end

    # Epoch seconds, a Float (no Time object made).
    def now
      Process.clock_gettime(Process::CLOCK_REALTIME)
    end

    def valid_worker_id?(id)
      id.is_a?(String) && WORKER_ID_PATTERN.match?(id)
    end

    # A worker id that is unique enough across hosts and restarts and safe
    # to use as a subscription prefix.
    def generate_worker_id
      host = ::Socket.gethostname.gsub(/[^A-Za-z0-9_-]/, "-")[0, 40]
      "#{host}-#{Process.pid}-#{Random.bytes(4).unpack1('H*')}"
    end

    # ---- builders -------------------------------------------------------

    # limits: optional {max_result_bytes:, max_message_bytes:, max_payload_depth:}.
    def batch(batch_id:, worker_id:, steps:, sent_at: now, limits: nil, version: VERSION)
      msg = { "protocol_version" => version, "type" => BATCH, "batch_id" => batch_id,
              "worker_id" => worker_id, "sent_at" => sent_at.to_f, "steps" => steps.map { |s| batch_step(**s) } }
      msg["limits"] = string_keys(limits, BATCH_LIMIT_FIELDS) if limits
      msg
    end

    def batch_step(step_id:, task_id:, step_name:, handler:, handler_config: {}, attempt: 1,
                   timeout_ms: nil, context: {}, dependency_results: {})
      { "step_id" => step_id, "task_id" => task_id, "step_name" => step_name, "handler" => handler,
        "handler_config" => handler_config, "attempt" => attempt, "timeout_ms" => timeout_ms,
        "context" => context, "dependency_results" => dependency_results }
    end

    # status is derived: an error object makes it "error", else "complete".
    def partial_result(batch_id:, worker_id:, step_id:, task_id:, attempt:, started_at:, finished_at:,
                       output: nil, error: nil, version: VERSION)
      { "protocol_version" => version, "type" => PARTIAL_RESULT, "worker_id" => worker_id,
        **result_entry(batch_id: batch_id, step_id: step_id, task_id: task_id, attempt: attempt,
                       started_at: started_at, finished_at: finished_at, output: output, error: error) }
    end

    # One step's result without the envelope: an entry of partial_results.
    def result_entry(batch_id:, step_id:, task_id:, attempt:, started_at:, finished_at:, output: nil, error: nil)
      { "batch_id" => batch_id, "step_id" => step_id, "task_id" => task_id, "attempt" => attempt,
        "status" => error ? STATUS_ERROR : STATUS_COMPLETE,
        "output" => error ? nil : output, "error" => error,
        "started_at" => started_at.to_f, "finished_at" => finished_at.to_f,
        "duration_ms" => ((finished_at.to_f - started_at.to_f) * 1000.0).round(3) }
    end

    # Version 2: several results (result_entry maps) in one message.
    def partial_results(worker_id:, results:)
      { "protocol_version" => VERSION, "type" => PARTIAL_RESULTS, "worker_id" => worker_id, "results" => results }
    end

    # The packed entry (a map of string keys) of one result, checked as
    # an entry of a version 2 message: what a worker hands its I/O thread.
    # Raises MessageError (an output key that is not a string, a field
    # missing or mistyped). keys_checked: the caller has already looked for
    # a non-string key in the output (non_string_key), so it is not walked
    # again. fields_checked: the caller built a complete entry from a
    # validated batch step and a Hash output (Worker::Partials), so its
    # fields are not checked again.
    def pack_entry(entry, keys_checked: false, fields_checked: false)
      unless fields_checked
        check_fields!(PARTIAL_RESULT, entry, RESULT_ENTRY_FIELDS, "")
        check_partial!(entry)
      end
      check_keys!(PARTIAL_RESULT, entry["output"], "output") unless keys_checked
      TaskerCore::Codec.pack(entry)
    end

    # [topic, body] of the packed entries (pack_entry), without decoding
    # them again: one partial_result for one entry, else one
    # partial_results. The envelope is spliced in front of the entries.
    def result_frames(worker_id, entries)
      if entries.size == 1
        entry = entries[0]
        n = entry.getbyte(0) - 0x80 # an entry has fewer than 16 keys: a fixmap
        raise ArgumentError, "not a packed result entry" unless n.between?(1, 15 - ENVELOPE_KEYS.size)

        return [PARTIAL_RESULT, ((0x80 + n + ENVELOPE_KEYS.size).chr.b << envelope_pairs(worker_id, PARTIAL_RESULT) <<
                                 entry.byteslice(1, entry.bytesize - 1))]
      end
      body = (0x84.chr.b << envelope_pairs(worker_id, PARTIAL_RESULTS) << TaskerCore::Codec.pack("results"))
      body << array_header(entries.size)
      entries.each { |e| body << e }
      [PARTIAL_RESULTS, body]
    end

    # The packed key/value pairs of the envelope (protocol_version, type,
    # worker_id), without a map header.
    def envelope_pairs(worker_id, type)
      @envelopes ||= {}
      @envelopes[[worker_id, type]] ||= begin
        packed = TaskerCore::Codec.pack({ "protocol_version" => VERSION, "type" => type, "worker_id" => worker_id })
        packed.byteslice(1, packed.bytesize - 1).freeze
      end
    end

    def array_header(n)
      return (0x90 + n).chr.b if n < 16
      return [0xdc, n].pack("Cn") if n < 65_536

      [0xdd, n].pack("CN")
    end

    # The error object of a failed partial_result.
    def error_object(klass:, message:, backtrace: [], retryable:, retry_after: nil)
      { "class" => klass.to_s, "message" => message.to_s,
        "backtrace" => Array(backtrace).first(BACKTRACE_LINES).map(&:to_s),
        "retryable" => retryable ? true : false,
        "retry_after" => retry_after&.to_f }
    end

    # Maps an exception raised by (or on behalf of) a handler to an error
    # object: the classification decides whether the orchestrator retries.
    def error_from_exception(exception)
      retryable, retry_after =
        case exception
        when TaskerCore::RetryableError then [true, exception.retry_after]
        when TaskerCore::PermanentError, TaskerCore::UnknownHandlerError then [false, nil]
        else [true, nil]
        end
      error_object(klass: exception.class.name || exception.class.inspect, message: exception.message,
                   backtrace: exception.backtrace || [], retryable: retryable, retry_after: retry_after)
    end

    def batch_completion(batch_id:, worker_id:, steps:, completed_at: now, version: VERSION)
      { "protocol_version" => version, "type" => BATCH_COMPLETION, "batch_id" => batch_id,
        "worker_id" => worker_id, "completed_at" => completed_at.to_f,
        "steps" => steps.map { |s| { "step_id" => s[:step_id] || s["step_id"], "attempt" => s[:attempt] || s["attempt"],
                                     "status" => s[:status] || s["status"] } } }
    end

    # connection: optional {"connects", "disconnects", "last_event", "last_event_at"}
    # from the worker's socket monitor; limits: optional {max_batch_steps:,
    # max_message_bytes:, max_payload_depth:}; in_flight_steps: optional
    # [[step_id, attempt], ...], sent with last_batch_id (which may be nil).
    # Each is left out when nil.
    def heartbeat(worker_id:, capacity:, in_flight:, pid: Process.pid, host: ::Socket.gethostname, sent_at: now,
                  connection: nil, limits: nil, last_batch_id: nil, in_flight_steps: nil, queues: nil,
                  version: VERSION)
      msg = { "protocol_version" => version, "type" => HEARTBEAT, "worker_id" => worker_id, "pid" => pid,
              "host" => host, "capacity" => capacity, "in_flight" => in_flight, "sent_at" => sent_at.to_f }
      if connection
        c = connection.transform_keys(&:to_s)
        msg["connection"] = { "connects" => c["connects"], "disconnects" => c["disconnects"],
                              "last_event" => c["last_event"]&.to_s,
                              "last_event_at" => c["last_event_at"]&.to_f }
      end
      msg["limits"] = string_keys(limits, WORKER_LIMIT_FIELDS) if limits
      msg["queues"] = queues.map(&:to_s) if queues
      if in_flight_steps
        msg["last_batch_id"] = last_batch_id
        msg["in_flight_steps"] = in_flight_steps.map { |id, attempt| [id, attempt] }
      end
      msg
    end

    # steps: [{step_id:, attempt:, reason:, message:}]; empty refuses the
    # whole batch (batch_id nil when it could not be read).
    def batch_refusal(batch_id:, worker_id:, reason:, message:, steps: [])
      { "protocol_version" => VERSION, "type" => BATCH_REFUSAL, "batch_id" => batch_id, "worker_id" => worker_id,
        "reason" => reason.to_s, "message" => message.to_s,
        "steps" => steps.map { |s| string_keys(s, REFUSAL_STEP_FIELDS) } }
    end

    def string_keys(hash, fields)
      fields.to_h { |name, _check, _desc| [name, hash.key?(name.to_sym) ? hash[name.to_sym] : hash[name]] }
    end

    def goodbye(worker_id:, reason:)
      { "protocol_version" => VERSION, "type" => GOODBYE, "worker_id" => worker_id, "reason" => reason.to_s }
    end

    # ---- framing --------------------------------------------------------

    # [topic, body] frames for a message, validated first so a bug on the
    # sending side shows up here rather than as a silent drop at the peer.
    def encode(msg)
      validate!(msg)
      [topic_for(msg), TaskerCore::Codec.pack(msg)]
    end

    # The message carried by [topic, body] frames, validated, with the topic
    # checked against the message. Raises MessageError. strict_batch: false
    # leaves a batch's step maps and limits unchecked: a worker checks each
    # step with step_problem (to refuse a bad step and run the others) and
    # reads the limits with batch_limits (a bad limit falls back to its own).
    def decode(frames, strict_batch: true)
      unless frames.is_a?(Array) && frames.size == 2 && frames.all?(String)
        raise MessageError.new("expected 2 frames [topic, body], got #{describe_frames(frames)}",
                               reason: :malformed_frames)
      end

      msg = begin
        TaskerCore::Codec.unpack(frames[1])
      rescue TaskerCore::ProtocolError, ArgumentError, TypeError => e
        raise MessageError.new("body is not valid msgpack: #{e.message}", reason: :undecodable)
      end
      validate!(msg, strict_batch: strict_batch)
      topic = frames[0].b
      expected = topic_for(msg).b
      unless topic == expected
        raise MessageError.new("topic #{topic.inspect} does not match a #{msg['type']} message " \
                               "(expected #{expected.inspect})", reason: :topic_mismatch, field: "topic")
      end
      msg
    end

    # Returns msg when it is a well-formed message of version 1 or 2;
    # raises MessageError naming the first offending field otherwise.
    # Version 2 adds partial_results and refuses a map key that is not a
    # string in an output.
    def validate!(msg, strict_batch: true)
      raise MessageError.new("message must be a map, got #{msg.class}", reason: :not_a_map) unless msg.is_a?(Hash)

      version = msg["protocol_version"]
      unless VERSIONS.include?(version)
        raise MessageError.new("protocol_version must be one of #{VERSIONS.join(', ')}, got #{version.inspect}",
                               reason: :wrong_version, field: "protocol_version")
      end

      type = msg["type"]
      unless TYPES.include?(type) && (version >= 2 || !V2_TYPES.include?(type))
        raise MessageError.new("unknown message type #{type.inspect} in protocol_version #{version} " \
                               "(known: #{TYPES.join(', ')}; #{V2_TYPES.join(', ')} from version 2)",
                               reason: :unknown_type, field: "type")
      end

      check_fields!(type, msg, FIELDS.fetch(type), "")
      case type
      when BATCH
        msg["steps"].each_with_index { |s, i| check_nested!(type, s, STEP_FIELDS, "steps", i) } if strict_batch
        check_nested!(type, msg["limits"], BATCH_LIMIT_FIELDS, "limits") if strict_batch && msg.key?("limits")
      when BATCH_COMPLETION
        msg["steps"].each_with_index { |s, i| check_nested!(type, s, COMPLETION_STEP_FIELDS, "steps", i) }
      when PARTIAL_RESULT
        check_partial!(msg)
        check_keys!(type, msg["output"], "output") if version >= 2
      when PARTIAL_RESULTS
        msg["results"].each_with_index do |r, i|
          check_nested!(type, r, RESULT_ENTRY_FIELDS, "results", i)
          check_partial!(r, "results[#{i}].")
          check_keys!(type, r["output"], "results[#{i}].output")
        end
      when HEARTBEAT
        check_heartbeat!(msg)
      when BATCH_REFUSAL
        msg["steps"].each_with_index { |s, i| check_nested!(type, s, REFUSAL_STEP_FIELDS, "steps", i) }
      end
      msg
    end

    # The problem with one step map of a batch (a MessageError naming the
    # field, e.g. "steps[2].attempt"), or nil when it is well-formed.
    def step_problem(step, index)
      check_nested!(BATCH, step, STEP_FIELDS, "steps", index)
      nil
    rescue MessageError => e
      e
    end

    def check_heartbeat!(msg)
      check_nested!(HEARTBEAT, msg["connection"], CONNECTION_FIELDS, "connection") if msg.key?("connection")
      check_nested!(HEARTBEAT, msg["limits"], WORKER_LIMIT_FIELDS, "limits") if msg.key?("limits")
      return unless msg.key?("in_flight_steps") || msg.key?("last_batch_id")

      check_fields!(HEARTBEAT, msg, [["last_batch_id", ->(v) { v.nil? || STR.call(v) }, "a non-empty String or nil"],
                                     ["in_flight_steps", ->(v) { v.is_a?(Array) && v.all?(STEP_REF) },
                                      "an Array of [step_id, attempt] pairs"]], "")
    end

    # The orchestrator's limits carried by a batch: {max_result_bytes:,
    # max_message_bytes:, max_payload_depth:} holding only the well-formed
    # ones (a missing or mistyped limit is left out, and the worker uses its
    # own setting for it). Empty for a batch without limits.
    def batch_limits(msg)
      limits = msg["limits"]
      return {} unless limits.is_a?(Hash)

      BATCH_LIMIT_FIELDS.each_with_object({}) do |(name, check, _desc), out|
        out[name.to_sym] = limits[name] if check.call(limits[name])
      end
    end

    # The batch_id of a batch body that could not be decoded in full (bad
    # msgpack further on, or nesting too deep for the decoder): reads the
    # top-level map's keys, skipping values without building them, and
    # returns the "batch_id" string, or nil when the body is not read that
    # far (not a map, broken before the key, no such key).
    def peek_batch_id(body)
      MsgpackScanner.new(body).top_level_string("batch_id")
    rescue MsgpackScanner::Stop
      nil
    end

    def check_partial!(msg, prefix = "")
      if msg["status"] == STATUS_ERROR
        invalid!(PARTIAL_RESULT, "#{prefix}error", "a map when status is \"error\"", msg["error"]) unless msg["error"].is_a?(Hash)
        check_fields!(PARTIAL_RESULT, msg["error"], ERROR_FIELDS, "#{prefix}error.")
      else
        invalid!(PARTIAL_RESULT, "#{prefix}error", "nil when status is \"complete\"", msg["error"]) unless msg["error"].nil?
        unless msg["output"].is_a?(Hash)
          invalid!(PARTIAL_RESULT, "#{prefix}output", "a map when status is \"complete\"", msg["output"])
        end
      end
    end

    # Version 2: every map key inside value is a String (or a Symbol, which
    # packs as one). Walks without recursion.
    def check_keys!(type, value, field)
      path = non_string_key(value, field)
      invalid!(type, path, "a map whose keys are strings (protocol version 2)", path.split(".").last) if path
    end

    # The path of the first map key inside value that does not pack as a
    # string ("output.rows[2].7"), or nil.
    def non_string_key(value, path = "output")
      return nil if value.is_a?(Hash) && flat_with_string_keys?(value) # the common case, without allocating

      stack = [[value, path]]
      until stack.empty?
        node, at = stack.pop
        case node
        when Hash
          node.each do |k, v|
            return "#{at}.#{k.inspect}" unless k.is_a?(String) || k.is_a?(Symbol)

            stack << [v, "#{at}.#{k}"] if v.is_a?(Hash) || v.is_a?(Array)
          end
        when Array
          node.each_with_index { |v, i| stack << [v, "#{at}[#{i}]"] if v.is_a?(Hash) || v.is_a?(Array) }
        end
      end
      nil
    end

    # A map of scalars under String (or Symbol) keys.
    def flat_with_string_keys?(hash)
      hash.each_pair do |k, v|
        return false unless (k.is_a?(String) || k.is_a?(Symbol)) && !v.is_a?(Hash) && !v.is_a?(Array)
      end
      true
    end

    # index: value is element index of the array at path ("steps[3]").
    def check_nested!(type, value, fields, path, index = nil)
      # Well-formed (the common case): nothing allocated for field names.
      return if value.is_a?(Hash) && fields_valid?(value, fields)

      path = "#{path}[#{index}]" if index
      invalid!(type, path, "a map", value) unless value.is_a?(Hash)
      check_fields!(type, value, fields, "#{path}.")
    end

    def fields_valid?(hash, fields)
      fields.all? { |name, check, _| hash.key?(name) && check.call(hash[name]) }
    end

    def check_fields!(type, hash, fields, prefix)
      fields.each do |name, check, description|
        unless hash.key?(name)
          field = "#{prefix}#{name}"
          raise MessageError.new("#{type}: missing field #{field}", reason: :invalid_field, field: field)
        end

        invalid!(type, "#{prefix}#{name}", description, hash[name]) unless check.call(hash[name])
      end
    end

    def invalid!(type, field, description, value)
      shown = value.inspect
      shown = "#{shown[0, 60]}..." if shown.size > 60
      raise MessageError.new("#{type}: field #{field} must be #{description}, got #{shown}",
                             reason: :invalid_field, field: field)
    end

    def describe_frames(frames)
      frames.is_a?(Array) ? "#{frames.size} frame(s)" : frames.class.to_s
    end

    private_class_method :check_partial!, :check_nested!, :check_fields!, :invalid!, :describe_frames,
                         :check_heartbeat!, :string_keys, :check_keys!, :envelope_pairs, :array_header,
                         :flat_with_string_keys?, :fields_valid?

    # Walks msgpack bytes without building objects and without recursion
    # (so no nesting is too deep for it): only for reading what it can out
    # of a body the decoder refused.
    class MsgpackScanner
      class Stop < StandardError; end

      def initialize(bytes)
        @b = bytes.b
        @pos = 0
      end

      def top_level_string(key)
        count = map_header or return nil
        count.times do
          k = string_value
          if k == key
            v = string_value
            return v.is_a?(String) && !v.empty? ? v.force_encoding(Encoding::UTF_8) : nil
          end
          skip_values(k.nil? ? 2 : 1) # a non-string key was not consumed by string_value
        end
        nil
      end

      private

      def byte
        c = @b.getbyte(@pos) or raise Stop
        @pos += 1
        c
      end

      def uint(size)
        raise Stop if @pos + size > @b.bytesize

        v = @b.byteslice(@pos, size).unpack1({ 1 => "C", 2 => "n", 4 => "N", 8 => "Q>" }.fetch(size))
        @pos += size
        v
      end

      def map_header
        c = byte
        case c
        when 0x80..0x8f then c & 0x0f
        when 0xde then uint(2)
        when 0xdf then uint(4)
        end
      end

      # A str at the position (consumed), or nil with the position unchanged.
      def string_value
        c = @b.getbyte(@pos) or raise Stop
        len = case c
              when 0xa0..0xbf then c & 0x1f
              when 0xd9 then (@pos += 1) && uint(1)
              when 0xda then (@pos += 1) && uint(2)
              when 0xdb then (@pos += 1) && uint(4)
              else return nil
              end
        @pos += 1 if c <= 0xbf
        raise Stop if @pos + len > @b.bytesize

        s = @b.byteslice(@pos, len)
        @pos += len
        s
      end

      # Skips n values (containers count their items as further values).
      def skip_values(n)
        while n.positive?
          n -= 1
          c = byte
          case c
          when 0x00..0x7f, 0xe0..0xff, 0xc0, 0xc2, 0xc3 then nil
          when 0x80..0x8f then n += 2 * (c & 0x0f)
          when 0x90..0x9f then n += c & 0x0f
          when 0xa0..0xbf then skip(c & 0x1f)
          when 0xc4, 0xd9 then skip(uint(1))
          when 0xc5, 0xda then skip(uint(2))
          when 0xc6, 0xdb then skip(uint(4))
          when 0xc7 then skip(uint(1) + 1)
          when 0xc8 then skip(uint(2) + 1)
          when 0xc9 then skip(uint(4) + 1)
          when 0xca then skip(4)
          when 0xcb then skip(8)
          when 0xcc, 0xd0 then skip(1)
          when 0xcd, 0xd1 then skip(2)
          when 0xce, 0xd2 then skip(4)
          when 0xcf, 0xd3 then skip(8)
          when 0xd4 then skip(2)
          when 0xd5 then skip(3)
          when 0xd6 then skip(5)
          when 0xd7 then skip(9)
          when 0xd8 then skip(17)
          when 0xdc then n += uint(2)
          when 0xdd then n += uint(4)
          when 0xde then n += 2 * uint(2)
          when 0xdf then n += 2 * uint(4)
          else raise Stop # 0xc1: never used
          end
        end
      end

      def skip(len)
        raise Stop if @pos + len > @b.bytesize

        @pos += len
      end
    end
  end
end
