# frozen_string_literal: true

module TaskerCore
  module Worker
    # Turns a step's outcome into its packed result entry (docs/protocol.md
    # 4.3: a partial_result without its envelope), within the
    # orchestrator's limits for that batch. Called on pool threads (so the
    # I/O thread only moves bytes: it splices entries that finished
    # together into one message) and by the watchdog for timeouts.
    class Partials
      # An error partial over the result limit keeps this much of its message.
      ERROR_MESSAGE_KEEP = 1000
      # Bytes a partial_result's envelope adds to its entry, at most
      # (protocol_version, type, worker_id of up to 128 bytes, map header).
      ENVELOPE_BYTES = 200

      # The largest result body the orchestrator takes: max_result_bytes
      # (0: none) and max_message_bytes, whichever is smaller; nil: no limit.
      def self.result_limit(limits)
        result = limits[:max_result_bytes]
        message = limits[:max_message_bytes]
        result = nil unless result.is_a?(Integer) && result.positive?
        message = nil unless message.is_a?(Integer) && message.positive?
        result && message ? [result, message].min : result || message
      end

      def initialize(worker_id:, stats:)
        @worker_id = worker_id
        @stats = stats
      end

      # The partial for job's output (a Hash) or error object, as an
      # Outgoing. An output the codec cannot pack, one nested deeper than the
      # orchestrator's max_payload_depth, or a result over its size limit
      # turns into a failed step (not retryable) that says so, rather than a
      # result the orchestrator would drop.
      def encode(job, output, error)
        limits = job.batch.limits
        if error.nil? && (too_deep = output_too_deep(output, limits[:max_payload_depth]))
          @stats.bump(:outputs_too_deep)
          error = too_deep
        end
        if error.nil? && (key = Protocol.non_string_key(output))
          # Version 2: keys are strings (docs/protocol.md 2).
          error = Protocol.error_object(klass: TypeError.name, retryable: false,
                                        message: "the step's output has a map key that is not a string at #{key} " \
                                                 "(protocol version 2 keys are strings)")
        end
        encode_checked(job, output, error, limits)
      rescue TaskerCore::ProtocolError, TypeError, ArgumentError, RangeError, EncodingError => e
        err = Protocol.error_object(klass: e.class.name, retryable: false, backtrace: [],
                                    message: "the step's output could not be encoded: #{e.message}")
        encode_checked(job, nil, err, limits)
      end

      # A retryable StepTimeoutError partial saying message.
      def timeout(job, message)
        error = Protocol.error_object(klass: TaskerCore::StepTimeoutError.name, message: message, retryable: true)
        out(job, partial_for(job, error: error))
      end

      private

      # Encodes the partial and measures the body it made against the result
      # limit: no second encoding unless it is too large.
      def encode_checked(job, output, error, limits)
        msg = partial_for(job, output: output, error: error)
        # #encode looked for non-string keys; a step completed with a Hash
        # output (the batch's step fields were checked when it arrived) is
        # well-formed by construction, a failure's error object is checked.
        entry = Protocol.pack_entry(msg, keys_checked: true, fields_checked: error.nil? && output.is_a?(Hash))
        limit = self.class.result_limit(limits)
        size = entry.bytesize + ENVELOPE_BYTES
        return Outgoing.new(entry: entry, kind: msg["status"], job: job, error: msg["error"], limit: limit) if limit.nil? || size <= limit

        if error && error["message"].size > ERROR_MESSAGE_KEEP
          # A failure whose message is too long keeps its class and retry
          # decision with the message cut short.
          short = error.merge("message" => "#{error['message'][0, ERROR_MESSAGE_KEEP]}... (cut: #{size} bytes " \
                                           "would be over the result limit of #{limit} bytes)")
          return encode_checked(job, nil, short, limits)
        end
        @stats.bump(:outputs_too_large)
        which = limit == limits[:max_result_bytes] ? "max_result_bytes" : "max_message_bytes"
        err = Protocol.error_object(klass: TaskerCore::PayloadTooLargeError.name, retryable: false,
                                    message: "the step's result is #{size} bytes, over the orchestrator's limit of " \
                                             "#{limit} bytes (#{which})")
        out(job, partial_for(job, error: err))
      end

      def out(job, msg)
        Outgoing.new(entry: Protocol.pack_entry(msg), kind: msg["status"], job: job, error: msg["error"],
                     limit: self.class.result_limit(job.batch.limits))
      end

      # The error object for an output nested deeper than limit, else nil.
      # Checks the Ruby object once, before it is packed.
      def output_too_deep(output, limit)
        return nil unless limit.is_a?(Integer) && output.is_a?(Hash) && Payload.depth(output, cap: limit) > limit

        Protocol.error_object(klass: TaskerCore::PayloadTooDeepError.name, retryable: false,
                              message: "the step's output nests arrays and maps more than #{limit} levels deep, " \
                                       "over the orchestrator's max_payload_depth of #{limit}")
      end

      def partial_for(job, output: nil, error: nil)
        step = job.step
        # A step that never started (timed out or given up while queued)
        # reports started_at = finished_at (docs/protocol.md 4.2).
        finished = Process.clock_gettime(Process::CLOCK_REALTIME)
        Protocol.result_entry(batch_id: job.batch.id, step_id: step["step_id"], task_id: step["task_id"],
                              attempt: step["attempt"], output: output, error: error,
                              started_at: job.started_at || finished, finished_at: finished)
      end
    end
  end
end
