# frozen_string_literal: true

module TaskerCore
  module Worker
    # Reads what arrives on the batch socket. A batch for this worker runs
    # the steps it can (Jobs for the Executor, opened in the Ledger) and
    # answers the rest with one batch_refusal, queued before any of its
    # partials; a body on this worker's topic that cannot be read is
    # refused whole; anything else is counted and dropped (Stats#bad).
    class Intake
      def initialize(settings:, registry:, ledger:, stats:, logger:)
        @settings = settings
        @worker_id = settings.worker_id
        @topic = Protocol.batch_topic(@worker_id).b
        @registry = registry
        @ledger = ledger
        @stats = stats
        @logger = logger
      end

      # From now on every step that arrives is refused as draining: the
      # worker is stopping.
      def draining!
        @draining = true
      end

      # The draining refusals (one per batch) for jobs taken from the queue
      # unstarted: the orchestrator hands their steps back (neither a lost
      # attempt nor a failure).
      def hand_back(jobs)
        jobs.group_by { |job| job.batch.id }.flat_map do |batch_id, batch_jobs|
          refuse_steps(batch_id, batch_jobs.map { |job| [job.step, "draining", draining_message] })
        end
      end

      # One message from the batch socket. Returns [jobs to run, Outgoing
      # messages to queue (refusals, an empty batch's completion)].
      def accept(frames)
        msg = Protocol.decode(frames, strict_batch: false)
        return none(:unexpected_type, "a #{msg['type']} message on the batch channel") unless msg["type"] == Protocol::BATCH
        return none(:wrong_worker, "a batch for worker #{msg['worker_id']}") unless msg["worker_id"] == @worker_id

        run_batch(msg)
      rescue Protocol::MessageError => e
        @stats.bad(e.reason, e.message)
        refusable?(frames, e) ? [[], refuse_unreadable(frames, e)] : [[], []]
      end

      private

      def none(reason, detail)
        @stats.bad(reason, detail)
        [[], []]
      end

      # A body on this worker's topic that is not valid msgpack (or nests
      # too deep for the decoder), or a batch whose envelope is broken.
      def refusable?(frames, error)
        return false unless frames.is_a?(Array) && frames.size == 2 && frames[0].b == @topic
        return true if error.reason == :undecodable

        error.reason == :invalid_field && Protocol::MsgpackScanner.new(frames[1]).top_level_string("type") == Protocol::BATCH
      rescue Protocol::MsgpackScanner::Stop
        false
      end

      def refuse_unreadable(frames, error)
        batch_id = Protocol.peek_batch_id(frames[1])
        @ledger.batch_seen(batch_id)
        @stats.bump(:batches_received)
        message = "worker #{@worker_id} could not read batch #{batch_id || '(id unreadable)'}: #{error.message}"
        refusals(batch_id, "undecodable", message, [])
      end

      def run_batch(msg)
        steps = msg["steps"]
        @stats.bump(:batches_received)
        @stats.bump(:steps_received, steps.size)
        limits = @ledger.batch_seen(msg["batch_id"], Protocol.batch_limits(msg))
        runnable = []
        refused = []
        missing = {} # handler name => why this worker lacks it (nil: it has it), once per batch
        steps.each_with_index do |step, index|
          reason, why = step_refusal(step, index, steps.size, missing)
          reason ? refused << [step, reason, why] : runnable << step
        end
        outgoing = refused.empty? ? [] : refuse_steps(msg["batch_id"], refused)

        batch = BatchState.new(id: msg["batch_id"], steps: runnable, statuses: Array.new(runnable.size), reported: 0,
                               limits: limits)
        outgoing << @ledger.completion(batch) if runnable.empty?
        jobs = runnable.each_with_index.map do |step, index|
          timeout = step["timeout_ms"].to_i.positive? ? step["timeout_ms"] / 1000.0 : @settings.step_timeout_s
          Job.new(batch: batch, index: index, step: step, timeout_s: timeout, state: :queued).tap { |j| @ledger.open(j) }
        end
        [jobs, outgoing]
      end

      # [reason, message] when this worker will not run the step, else nil.
      def step_refusal(step, index, count, missing)
        return ["draining", draining_message] if @draining

        max = @settings.max_batch_steps
        if max && index >= max
          return ["too_many_steps", "batch of #{count} steps is over this worker's max_batch_steps of #{max}"]
        end
        if (problem = Protocol.step_problem(step, index))
          @stats.bad(:invalid_field, problem.message)
          return ["invalid_step", problem.message]
        end

        too_deep = payload_too_deep(step)
        return ["too_deep", too_deep] if too_deep

        handler = step["handler"]
        why = missing.fetch(handler) { missing[handler] = handler_missing(handler) }
        why && ["unknown_handler", why]
      end

      def draining_message = "worker #{@worker_id} is shutting down; the step did not start"

      # Why this worker cannot run handler name (it has no such handler), or
      # nil. A handler that fails to load for another reason is run, and its
      # step fails with that error.
      def handler_missing(name)
        return nil if @registry.registered?(name)

        TaskerCore.wrap_handler_lookup { @registry.resolve(name) }
        nil
      rescue UnknownHandlerError => e
        "worker #{@worker_id} has no handler #{name}: #{e.message}"
      rescue StandardError, ScriptError
        nil
      end

      # What in the step nests deeper than this worker's max_payload_depth
      # (its context, handler_config or a dependency's output), or nil.
      def payload_too_deep(step)
        limit = @settings.max_payload_depth
        return nil unless limit.is_a?(Integer)

        found = too_deep(step["context"], limit) { "context" } ||
                too_deep(step["handler_config"], limit) { "handler_config" }
        return found if found

        step["dependency_results"].each do |name, output|
          found = too_deep(output, limit) { "the output of dependency #{name}" }
          return found if found
        end
        nil
      end

      # The refusal message when value nests deeper than limit (the block
      # names what it is), else nil.
      def too_deep(value, limit)
        # Decoded values nest at most Codec::MAX_DEPTH deep: measured exactly.
        depth = Payload.depth(value)
        return nil if depth <= limit

        "worker #{@worker_id} refused the step: #{yield} nests #{depth} levels, over max_payload_depth #{limit}"
      end

      # One batch_refusal for the refused steps of a batch. A step whose
      # step_id or attempt cannot be read cannot be named: it is counted,
      # and the orchestrator takes it back when a heartbeat reports this
      # batch without it (docs/protocol.md section 6).
      def refuse_steps(batch_id, refused)
        entries = []
        refused.each do |step, reason, why|
          @stats.tally(:steps_refused, reason.to_sym)
          if step.is_a?(Hash) && Protocol::INT.call(step["step_id"]) && Protocol::POS_INT.call(step["attempt"])
            entries << { step_id: step["step_id"], attempt: step["attempt"], reason: reason, message: why }
          else
            @stats.bump(:steps_refused_unnamed)
          end
        end
        return [] if entries.empty?

        reasons = entries.map { |e| e[:reason] }.tally
        why = reasons.size == 1 ? entries.first[:message] : reasons.map { |r, n| "#{n} #{r}" }.join(", ")
        message = "worker #{@worker_id} refused #{entries.size} step(s) of batch #{batch_id}: #{why}"
        refusals(batch_id, reasons.max_by { |_r, n| n }.first, message, entries)
      end

      # The batch_refusal(s) for entries: one over the orchestrator's result
      # limit goes out in parts. Their steps count as in flight until sent.
      def refusals(batch_id, reason, message, entries)
        msg = Protocol.batch_refusal(batch_id: batch_id, worker_id: @worker_id, reason: reason, message: message,
                                     steps: entries)
        frames = Protocol.encode(msg)
        limit = Partials.result_limit(@ledger.result_limits)
        if limit && frames[1].bytesize > limit && entries.size > 1
          half = entries.size / 2
          return refusals(batch_id, reason, message, entries.first(half)) +
                 refusals(batch_id, reason, message, entries.drop(half))
        end

        # a draining worker's refusals are its normal shutdown
        unless reason == "draining"
          @stats.warn_once(:"refused_#{reason}") { "#{message}; further #{reason} refusals are only counted" }
        end
        [Outgoing.new(frames: frames, kind: :refusal, refused: @ledger.hold_refused(entries))]
      end
    end
  end
end
