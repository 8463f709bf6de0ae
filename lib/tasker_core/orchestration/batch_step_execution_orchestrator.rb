# frozen_string_literal: true

require "logger"
require "set"

module TaskerCore
  module Orchestration
    # The worker side of wire protocol v1 (docs/protocol.md): receives batches
    # addressed to this worker, runs their steps on a fixed thread pool and
    # streams one partial_result per step, then one batch_completion per batch.
    #
    # Threads:
    # - one I/O thread owns both sockets (a libzmq socket belongs to the thread
    #   that made it). It waits in TaskerCore::Socket.select on the batch
    #   subscriber, the result publisher (to see the orchestrator's
    #   subscription) and a wake-up pipe, so neither incoming batches nor
    #   finished results wait behind each other. It is also the watchdog for
    #   step timeouts, so all bookkeeping of what was reported lives here.
    # - max_workers pool threads pop steps from a Thread::Queue, run handlers,
    #   encode the partial and hand it back through a Queue plus a byte on the
    #   wake-up pipe. They never touch a socket.
    class BatchStepExecutionOrchestrator
      # A dotted configuration key ("worker.max_workers"): the default of
      # every keyword argument below.
      def self.setting(key)
        TaskerCore.config.dig(*key.split("."))
      end

      # Raised into a handler's thread when its step times out. Not a
      # StandardError, so a handler's `rescue => e` cannot swallow it.
      class TimeoutInterrupt < Exception; end # rubocop:disable Lint/InheritException

      # How long a timed-out handler gets to unwind after the interrupt before
      # its thread is given up on and replaced.
      TIMEOUT_GRACE_S = 1.0
      # Back-off before retrying a send the publisher refused at its HWM.
      SEND_RETRY_S = 0.005
      # Upper bound of one wait, so a missed wake-up costs at most this much.
      MAX_WAIT_S = 1.0
      # A socket that reported `disconnected` and no `connected` within this
      # long is closed and opened again. libzmq reconnects a dropped TCP
      # connection after ZMQ_RECONNECT_IVL (100 ms) plus up to as much
      # jitter, but not one it dropped itself (libzmq 4.3.4: a message over
      # ZMQ_MAXMSGSIZE, a refused handshake). Doubles per reopen that sees no
      # successful handshake, up to REOPEN_GRACE_MAX_S.
      REOPEN_GRACE_S = 0.5
      REOPEN_GRACE_MAX_S = 10.0
      # One warning per kind of handshake failure per this many seconds.
      HANDSHAKE_LOG_INTERVAL_S = 60.0
      # An error partial over the result limit keeps this much of its message.
      ERROR_MESSAGE_KEEP = 1000
      # Optional heartbeat fields, left out in this order (the least needed
      # first) while the heartbeat is over the orchestrator's result limit,
      # which applies to every body on the result channel.
      HEARTBEAT_SHEDDING = [%i[in_flight_steps last_batch_id], %i[connection], %i[limits]].freeze

      Job = Struct.new(:batch, :index, :step, :timeout_s, :state, :thread, :started_at, :deadline,
                       :grace_deadline, keyword_init: true)
      # limits: the orchestrator's limits for this batch's results
      # ({max_result_bytes:, max_message_bytes:, max_payload_depth:}).
      BatchState = Struct.new(:id, :steps, :statuses, :reported, :limits, keyword_init: true)
      # kind: a status, :completion or :refusal; job: the step a partial
      # reports; refused: the [step_id, attempt] pairs a refusal answers.
      Outgoing = Struct.new(:frames, :kind, :job, :error, :refused, keyword_init: true)

      attr_reader :worker_id, :max_workers

      def initialize(step_sub_endpoint: self.class.setting("zeromq.batch_endpoint"),
                     result_pub_endpoint: self.class.setting("zeromq.result_endpoint"),
                     max_workers: self.class.setting("worker.max_workers"),
                     handler_registry: TaskerCore::HandlerRegistry.default,
                     worker_id: nil,
                     heartbeat_interval_ms: self.class.setting("zeromq.heartbeat_interval_ms"),
                     step_timeout_ms: self.class.setting("worker.step_timeout_ms"),
                     shutdown_timeout_ms: self.class.setting("worker.shutdown_timeout_ms"),
                     send_hwm: self.class.setting("zeromq.send_hwm"),
                     recv_hwm: self.class.setting("zeromq.recv_hwm"),
                     linger_ms: self.class.setting("zeromq.linger_ms"),
                     timeout_grace_s: TIMEOUT_GRACE_S,
                     curve: :config,
                     max_message_bytes: self.class.setting("zeromq.max_message_bytes"),
                     max_batch_steps: self.class.setting("zeromq.max_batch_steps"),
                     max_payload_depth: self.class.setting("zeromq.max_payload_depth"),
                     max_result_bytes: self.class.setting("zeromq.max_result_bytes"),
                     reopen_grace_s: REOPEN_GRACE_S,
                     logger: nil)
        @worker_id = worker_id || Protocol.generate_worker_id
        raise ArgumentError, "worker_id #{@worker_id.inspect} must match #{Protocol::WORKER_ID_PATTERN.source}" unless Protocol.valid_worker_id?(@worker_id)
        raise ArgumentError, "max_workers must be a positive Integer" unless max_workers.is_a?(Integer) && max_workers.positive?

        @batch_endpoint = step_sub_endpoint
        @result_endpoint = result_pub_endpoint
        @max_workers = max_workers
        @registry = handler_registry
        @heartbeat_interval_s = heartbeat_interval_ms / 1000.0
        @step_timeout_s = step_timeout_ms / 1000.0
        @shutdown_timeout_s = shutdown_timeout_ms / 1000.0
        @send_hwm = send_hwm
        @recv_hwm = recv_hwm
        @linger_ms = linger_ms
        @timeout_grace_s = timeout_grace_s
        # CURVE client keys ({server_key:, public_key:, secret_key:}) or nil;
        # read now so a bad key file fails here, not in the I/O thread.
        @curve = curve == :config ? TaskerCore::Curve.client_options(TaskerCore.config) : curve
        @max_message_bytes = max_message_bytes
        @max_batch_steps = max_batch_steps
        @max_payload_depth = max_payload_depth
        # Used for results when a batch carries no limits (older orchestrators).
        @own_result_limits = { max_result_bytes: max_result_bytes, max_message_bytes: max_message_bytes,
                               max_payload_depth: max_payload_depth }.compact.freeze
        @reopen_grace_s = reopen_grace_s
        @logger = logger || (TaskerCore.respond_to?(:logger) && TaskerCore.logger) || Logger.new($stderr)

        @mutex = Mutex.new # guards job states, @running, @pool, @next_wake_at
        @stats_mutex = Mutex.new
        @stats = { batches_received: 0, steps_received: 0, steps_completed: 0, steps_failed: 0,
                   steps_timed_out: 0, late_results_discarded: 0, threads_abandoned: 0,
                   partials_sent: 0, completions_sent: 0, heartbeats_sent: 0, send_retries: 0,
                   results_unsent: 0, bad_messages: Hash.new(0),
                   refusals_sent: 0, steps_refused: Hash.new(0), steps_refused_unnamed: 0,
                   outputs_too_large: 0, outputs_too_deep: 0, sockets_reopened: 0,
                   handshake_failures: Hash.new(0) }
        @logged_reasons = Set.new
        @handshake_logged = {} # event => [monotonic time of the last warning, failures since]
        @jobs = Thread::Queue.new
        @results = Thread::Queue.new
        @running = Set.new.compare_by_identity # Jobs are mutable Structs: hash by identity
        @pool = []
        @paused = false
        @stop_requested = false
        @stop_timeout_s = @shutdown_timeout_s
        @next_wake_at = nil
        @io_thread = nil
        @endpoint_change = nil # [batch, result] for the I/O thread to reconnect to (discovery)
        @connection_history = [] # socket monitor events, newest last (CONNECTION_HISTORY kept)
        # Lifetime totals over both sockets, sent in each heartbeat's "connection".
        @connection_counts = { "connects" => 0, "disconnects" => 0, "last_event" => nil, "last_event_at" => nil }
      end

      CONNECTION_HISTORY = 50
      # Reconnect attempts while an orchestrator is away: not kept in the history.
      NOISY_EVENTS = %i[connect_delayed connect_retried].freeze

      # Moves both sockets to new endpoints (a new orchestrator took over).
      # Accepted steps keep running; results not yet sent go to the new one.
      def reconnect(batch_endpoint:, result_endpoint:)
        @mutex.synchronize { @endpoint_change = [batch_endpoint, result_endpoint] }
        wake
        self
      end

      def endpoints
        { batch_endpoint: @batch_endpoint, result_endpoint: @result_endpoint }
      end

      # [{socket: :batch|:result, event:, endpoint:, at:}], oldest first.
      def connection_history
        @stats_mutex.synchronize { @connection_history.dup }
      end

      # {"connects", "disconnects", "last_event", "last_event_at"}: the
      # connected/disconnected socket monitor events of both sockets since
      # start (not only the kept history) and the latest of them; the
      # heartbeat's optional "connection" field.
      def connection_summary
        @stats_mutex.synchronize { @connection_counts.dup }
      end

      # Connects and starts the I/O thread and the pool. Raises the error the
      # I/O thread met while opening its sockets (a bad endpoint, say).
      def start
        raise TaskerCore::Error, "worker #{@worker_id} already started" if @io_thread

        @wake_r, @wake_w = IO.pipe
        ready = Thread::Queue.new
        @io_thread = Thread.new { io_main(ready) }
        @io_thread.name = "tasker-worker-io"
        outcome = ready.pop
        if outcome.is_a?(Exception)
          @io_thread.join
          @io_thread = nil
          raise outcome
        end
        @mutex.synchronize { @max_workers.times { @pool << spawn_pool_thread } }
        self
      end

      # Never shows the CURVE secret key.
      def inspect
        "#<#{self.class.name} worker_id=#{@worker_id.inspect} max_workers=#{@max_workers} curve=#{!@curve.nil?}>"
      end

      # The exception that ended the I/O thread, if one did.
      attr_reader :error

      def running?
        !@io_thread.nil? && @io_thread.alive? && !@stop_requested
      end

      # Stops taking work: heartbeats advertise capacity 0, so a credit-based
      # orchestrator sends nothing more. Batches already sent are still run.
      def pause
        @paused = true
        wake
        self
      end

      def resume
        @paused = false
        wake
        self
      end

      def paused?
        @paused
      end

      # Drains: advertises capacity 0, finishes (or times out) every accepted
      # step, sends every partial and completion, says goodbye and closes.
      # Steps still unfinished after `timeout` are reported as failed with
      # StepTimeoutError, retryable. Returns true when the I/O thread ended.
      def stop(timeout: @shutdown_timeout_s)
        return true unless @io_thread

        @stop_timeout_s = timeout
        @stop_requested = true
        wake
        finished = @io_thread.join(timeout + (@linger_ms / 1000.0) + 5)
        @jobs.close
        pool = @mutex.synchronize { @pool.dup }
        pool.each { |t| t.join(@timeout_grace_s) }
        !finished.nil?
      end

      def stats
        @stats_mutex.synchronize do
          @stats.merge(bad_messages: @stats[:bad_messages].dup, steps_refused: @stats[:steps_refused].dup,
                       handshake_failures: @stats[:handshake_failures].dup, in_flight: @in_flight || 0,
                       worker_id: @worker_id, peer_subscribed: (@peer_subscriptions || 0).positive?,
                       endpoints: endpoints, connection_history: @connection_history.dup)
        end
      end

      private

      # ---- pool threads -----------------------------------------------------

      def spawn_pool_thread
        thread = Thread.new { pool_main }
        thread.name = "tasker-worker-pool"
        thread
      end

      def pool_main
        # Timeout interrupts are only let in while a handler runs; one that
        # arrives between steps must not hit the next step (see run_job).
        Thread.handle_interrupt(TimeoutInterrupt => :never) do
          while (job = @jobs.pop)
            run_job(job)
            break if Thread.current[:tc_abandoned]
          end
        end
      end

      def run_job(job)
        @mutex.synchronize do
          return unless job.state == :queued # timed out by shutdown before it started

          job.state = :running
          job.thread = Thread.current
          job.started_at = Time.now.to_f
          job.deadline = monotonic + job.timeout_s
          @running << job
          wake if @next_wake_at.nil? || job.deadline < @next_wake_at
        end

        frames = status = error = nil
        claimed = false
        instrument_step(:step_started, job)
        begin
          Thread.handle_interrupt(TimeoutInterrupt => :immediate) do
            output, error = execute(job)
            frames, status, error = encode_partial(job, output, error)
            # After this, the watchdog no longer interrupts the thread.
            claimed = @mutex.synchronize do
              job.state == :running && (job.state = :done)
            end
          end
        rescue TimeoutInterrupt
          claimed = false
        end
        discard_pending_interrupt

        @mutex.synchronize { @running.delete(job) }
        if claimed
          @results << Outgoing.new(frames: frames, kind: status, job: job, error: error)
          wake
          instrument_step(status == Protocol::STATUS_COMPLETE ? :step_completed : :step_failed, job, error || {})
        else
          bump(:late_results_discarded)
        end
      end

      # Events for TaskerCore.subscribe / ActiveSupport::Notifications (a
      # timed-out step is reported by the watchdog, not here).
      # error: the failed step's error object ({} when it completed).
      def instrument_step(event, job, error = nil)
        return unless Instrumentation.listening?(event)

        step = job.step
        payload = { step_id: step["step_id"], task_id: step["task_id"], step_name: step["step_name"],
                    handler: step["handler"], attempt: step["attempt"], worker_id: @worker_id, batch_id: job.batch.id }
        if error
          payload[:duration_ms] = ((Time.now.to_f - job.started_at) * 1000).round(3)
          if event == :step_failed
            payload.merge!(error_class: error["class"], error_message: error["message"], retryable: error["retryable"])
          end
        end
        Instrumentation.instrument(event, payload)
      rescue StandardError => e
        @logger.warn("tasker worker #{@worker_id}: instrumenting #{event}: #{e.message}")
      end

      def execute(job)
        task, sequence, step = StepContext.from_wire(job.step, batch_id: job.batch.id)
        # TaskerCore.handler_wrapper: the Rails executor and reloader under Rails.
        output = TaskerCore.wrap_handler { @registry.handler_for(job.step["handler"]).call(task, sequence, step) }
        return [output, nil] if output.is_a?(Hash)

        # A deterministic bug in the handler: retrying gives the same answer.
        [nil, Protocol.error_object(klass: "TypeError", retryable: false,
                                    message: "handler #{job.step['handler']} returned #{output.class}, " \
                                             "a step's output must be a Hash")]
      rescue TimeoutInterrupt
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        # Anything a handler raises (NotImplementedError and SystemStackError
        # are not StandardErrors) fails its step, never the worker.
        [nil, Protocol.error_from_exception(e)]
      end

      # Encoded here, on the pool thread, so the I/O thread only moves bytes.
      # Returns [frames, status, error object or nil]. An output the codec
      # cannot pack, one nested deeper than the orchestrator's
      # max_payload_depth, or a result over its size limit turns into a
      # failed step (not retryable) that says so, rather than a result the
      # orchestrator would drop.
      def encode_partial(job, output, error)
        limits = job.batch.limits
        if error.nil? && (too_deep = output_too_deep(output, limits[:max_payload_depth]))
          bump(:outputs_too_deep)
          error = too_deep
        end
        encode_checked(job, output, error, limits)
      rescue TaskerCore::ProtocolError, TypeError, ArgumentError, RangeError, EncodingError => e
        err = Protocol.error_object(klass: e.class.name, retryable: false, backtrace: [],
                                    message: "the step's output could not be encoded: #{e.message}")
        encode_checked(job, nil, err, limits)
      end

      # Encodes the partial and measures the body it made against the result
      # limit: no second encoding unless it is too large.
      def encode_checked(job, output, error, limits)
        msg = partial_for(job, output: output, error: error, started_at: job.started_at)
        frames = Protocol.encode(msg)
        limit = result_limit(limits)
        return [frames, msg["status"], msg["error"]] if limit.nil? || frames[1].bytesize <= limit

        size = frames[1].bytesize
        if error && error["message"].size > ERROR_MESSAGE_KEEP
          # A failure whose message is too long keeps its class and retry
          # decision with the message cut short.
          short = error.merge("message" => "#{error['message'][0, ERROR_MESSAGE_KEEP]}... (cut: #{size} bytes " \
                                           "would be over the result limit of #{limit} bytes)")
          return encode_checked(job, nil, short, limits)
        end
        bump(:outputs_too_large)
        which = limit == limits[:max_result_bytes] ? "max_result_bytes" : "max_message_bytes"
        err = Protocol.error_object(klass: TaskerCore::PayloadTooLargeError.name, retryable: false,
                                    message: "the step's result is #{size} bytes, over the orchestrator's limit of " \
                                             "#{limit} bytes (#{which})")
        msg = partial_for(job, error: err, started_at: job.started_at)
        [Protocol.encode(msg), msg["status"], err]
      end

      # The largest result body the orchestrator takes: max_result_bytes
      # (0: none) and max_message_bytes, whichever is smaller; nil: no limit.
      def result_limit(limits)
        [limits[:max_result_bytes], limits[:max_message_bytes]].select { |v| v.is_a?(Integer) && v.positive? }.min
      end

      # The error object for an output nested deeper than limit, else nil.
      # Checks the Ruby object once, before it is packed.
      def output_too_deep(output, limit)
        return nil unless limit.is_a?(Integer) && output.is_a?(Hash) && Payload.depth(output, cap: limit) > limit

        Protocol.error_object(klass: TaskerCore::PayloadTooDeepError.name, retryable: false,
                              message: "the step's output nests arrays and maps more than #{limit} levels deep, " \
                                       "over the orchestrator's max_payload_depth of #{limit}")
      end

      def partial_for(job, started_at:, output: nil, error: nil)
        Protocol.partial_result(batch_id: job.batch.id, worker_id: @worker_id, step_id: job.step["step_id"],
                                task_id: job.step["task_id"], attempt: job.step["attempt"], output: output,
                                error: error, started_at: started_at || Time.now.to_f, finished_at: Time.now.to_f)
      end

      def discard_pending_interrupt
        return unless Thread.pending_interrupt?(TimeoutInterrupt)

        Thread.handle_interrupt(TimeoutInterrupt => :immediate) { nil }
      rescue TimeoutInterrupt
        nil
      end

      # ---- I/O thread -------------------------------------------------------

      def io_main(ready)
        begin
          open_sockets
        rescue Exception => e # rubocop:disable Lint/RescueException
          ready << e
          return
        end
        ready << :ok
        @logger.info("tasker worker #{@worker_id}: #{@max_workers} threads, batches from #{@batch_endpoint}, " \
                     "results to #{@result_endpoint}")
        io_loop
      rescue Exception => e # rubocop:disable Lint/RescueException
        # Kept rather than re-raised so #stop's join returns; see #error.
        @error = e
        @logger.error("tasker worker #{@worker_id}: I/O thread failed: #{e.class}: #{e.message}\n" \
                      "#{Array(e.backtrace).first(10).join("\n")}")
      ensure
        close_sockets
      end

      def open_sockets
        @in_flight = 0
        # Steps counted in in_flight: token (a Job, or a refused step's
        # entry until its refusal is sent) => [step_id, attempt].
        @unreported = {}.compare_by_identity
        @last_batch_id = nil
        # The orchestrator's limits from the latest batch (every message on
        # the result channel must fit them), or this worker's own.
        @result_limits = @own_result_limits
        @outbox = []
        @open_jobs = Set.new.compare_by_identity
        @peer_subscriptions = 0
        @next_heartbeat_at = nil
        @retry_at = nil
        @links = { batch: { down_since: nil, reopens: 0 }, result: { down_since: nil, reopens: 0 } }
        @sub = open_socket(:batch)
        @pub = open_socket(:result)
      end

      # The one place a socket of this worker is made, from its settings, so
      # a reopened or moved socket keeps its CURVE keys, high-water marks,
      # message size limit, linger and monitor.
      def open_socket(kind)
        common = { linger: @linger_ms, curve_client: @curve, max_message_bytes: @max_message_bytes, monitor: true }.compact
        if kind == :batch
          TaskerCore::Socket::Subscriber.new(connect: @batch_endpoint, topics: [Protocol.batch_topic(@worker_id)],
                                             recv_hwm: @recv_hwm, **common)
        else
          TaskerCore::Socket::Publisher.new(connect: @result_endpoint, send_hwm: @send_hwm, **common)
        end
      end

      def apply_endpoint_change
        change = @mutex.synchronize { @endpoint_change.tap { @endpoint_change = nil } }
        return false if change.nil? || change == [@batch_endpoint, @result_endpoint]

        record_socket_events
        @logger.info("tasker worker #{@worker_id}: moving to batches from #{change[0]}, results to #{change[1]}")
        @batch_endpoint, @result_endpoint = change
        reopen(:batch)
        reopen(:result)
        # The new orchestrator sent none of the batches received so far
        # (reopen took the last ones from the old socket).
        @last_batch_id = nil
        @result_limits = @own_result_limits
        @links.each_value { |l| l[:reopens] = 0 }
        true
      end

      # Closes a socket and opens it again on the current endpoint (with its
      # subscription, for the batch socket). Batches already received are
      # taken first; results the publisher had not yet sent are lost with it
      # and reconciled by the orchestrator from the next heartbeat.
      def reopen(kind)
        if kind == :batch
          receive_batches
          @sub.close
          @sub = open_socket(:batch)
        else
          @pub.close
          @pub = open_socket(:result)
          @peer_subscriptions = 0
          @next_heartbeat_at = nil
        end
        @links[kind][:down_since] = nil
      end

      # A socket whose connection dropped and did not come back within its
      # grace period is reopened (see REOPEN_GRACE_S).
      def reopen_dead_sockets
        now = monotonic
        @links.each do |kind, link|
          next unless link[:down_since] && now >= link[:down_since] + reopen_grace(link)

          endpoint = kind == :batch ? @batch_endpoint : @result_endpoint
          @logger.warn("tasker worker #{@worker_id}: the #{kind} socket lost its connection to #{endpoint} and did not " \
                       "reconnect within #{reopen_grace(link).round(2)} s; opening it again")
          link[:reopens] += 1
          bump(:sockets_reopened)
          reopen(kind)
        end
      end

      def reopen_grace(link)
        [@reopen_grace_s * (2**[link[:reopens], 16].min), [REOPEN_GRACE_MAX_S, @reopen_grace_s].max].min
      end

      def record_socket_events
        events = @sub.events.map { |e| e.merge(socket: :batch) } + @pub.events.map { |e| e.merge(socket: :result) }
        events.reject! { |e| NOISY_EVENTS.include?(e[:event]) }
        return if events.empty?

        events.sort_by! { |e| e[:at] }
        events.each { |e| track_link(e) }
        @stats_mutex.synchronize do
          events.each { |e| count_connection_event(e) }
          @connection_history.concat(events)
          @connection_history.shift(@connection_history.size - CONNECTION_HISTORY) if @connection_history.size > CONNECTION_HISTORY
        end
      end

      # Follows each socket's connection from its monitor events.
      def track_link(event)
        link = @links[event[:socket]]
        case event[:event]
        when :disconnected then link[:down_since] ||= monotonic
        when :connected then link[:down_since] = nil
        when :handshake_succeeded then link[:reopens] = 0
        else
          handshake_failed(event) if event[:event].to_s.start_with?("handshake_failed")
        end
      end

      # Warns once per kind of failure per HANDSHAKE_LOG_INTERVAL_S (with the
      # number of failures since the last warning); counts every one.
      def handshake_failed(event)
        kind = event[:event]
        @stats_mutex.synchronize { @stats[:handshake_failures][kind] += 1 }
        last_at, since = @handshake_logged[kind]
        now = monotonic
        if last_at && now - last_at < HANDSHAKE_LOG_INTERVAL_S
          @handshake_logged[kind] = [last_at, since + 1]
          return
        end

        @handshake_logged[kind] = [now, 0]
        more = since.to_i.positive? ? " (#{since} more since the last warning)" : ""
        hint = ""
        hint = "; is this worker's CURVE public key on the orchestrator's allow-list?" if kind == :handshake_failed_auth
        @logger.warn("tasker worker #{@worker_id}: #{event[:socket]} socket handshake with #{event[:endpoint]} failed " \
                     "(#{kind})#{more}#{hint}")
      end

      # Only connected/disconnected change the connection state; handshake
      # and close events are kept in the history but not counted here.
      def count_connection_event(event)
        key = { connected: "connects", disconnected: "disconnects" }[event[:event]]
        return unless key

        c = @connection_counts
        c[key] += 1
        c["last_event"] = event[:event].to_s
        c["last_event_at"] = event[:at].to_f
      end

      def close_sockets
        @sub&.close
        @pub&.close
        @wake_r&.close
        @wake_w&.close
      rescue StandardError => e
        @logger.warn("tasker worker #{@worker_id}: closing sockets: #{e.message}")
      end

      def io_loop
        advertised_capacity = nil
        drain_deadline = nil
        loop do
          readable = TaskerCore::Socket.select([@sub, @pub, @wake_r], wait_ms(drain_deadline))
          drain_wake_pipe if readable.include?(@wake_r)
          readable = [] if apply_endpoint_change
          record_socket_events
          reopen_dead_sockets
          if @stop_requested && drain_deadline.nil?
            drain_deadline = monotonic + @stop_timeout_s
            @logger.info("tasker worker #{@worker_id}: draining #{@in_flight} step(s)")
          end
          track_subscriptions
          receive_batches if readable.include?(@sub)
          collect_results
          watch_timeouts
          capacity = current_capacity
          if capacity != advertised_capacity && peer_subscribed?
            # Pause, resume and drain take effect at the orchestrator now,
            # not one heartbeat interval later.
            @next_heartbeat_at = monotonic
            advertised_capacity = capacity
          end
          # Flushed before the heartbeat too, so the heartbeat's in-flight
          # list reflects as much as possible of what was reported.
          flush_outbox
          send_heartbeat_if_due
          flush_outbox

          next unless drain_deadline
          break if @in_flight.zero? && @outbox.empty?

          if monotonic >= drain_deadline
            shutdown_unfinished
            flush_until(monotonic + (@linger_ms / 1000.0))
            break
          end
        end
        finish
      end

      def finish
        @sub.unsubscribe(Protocol.batch_topic(@worker_id))
        unless @outbox.empty?
          bump(:results_unsent, @outbox.size)
          @logger.error("tasker worker #{@worker_id}: #{@outbox.size} message(s) could not be sent before shutdown " \
                        "(orchestrator #{peer_subscribed? ? 'not keeping up' : 'not connected'}); " \
                        "the orchestrator re-dispatches those steps")
        end
        @pub.send_parts(Protocol.encode(Protocol.goodbye(worker_id: @worker_id, reason: "shutdown"))) if peer_subscribed?
        @logger.info("tasker worker #{@worker_id}: stopped")
      end

      def wait_ms(drain_deadline)
        return 0 unless @results.empty?

        now = monotonic
        candidates = [now + MAX_WAIT_S]
        candidates << @next_heartbeat_at if @next_heartbeat_at
        candidates << @retry_at if @retry_at && !@outbox.empty?
        candidates << drain_deadline if drain_deadline
        @links.each_value { |l| candidates << l[:down_since] + reopen_grace(l) if l[:down_since] }
        @mutex.synchronize do
          @running.each do |job|
            candidates << job.deadline if job.state == :running
            candidates << job.grace_deadline if job.state == :timed_out && job.grace_deadline
          end
          @next_wake_at = candidates.min
        end
        [((@next_wake_at - now) * 1000).ceil, 0].max
      end

      def drain_wake_pipe
        loop do
          chunk = @wake_r.read_nonblock(4096, exception: false)
          break if chunk == :wait_readable || chunk.nil? || chunk.bytesize < 4096
        end
      end

      def wake
        @wake_w&.write_nonblock(".", exception: false)
      rescue IOError
        nil # pipe closed: the I/O thread has finished and needs no wake-up
      end

      def track_subscriptions
        @pub.subscriptions(timeout_ms: 0).each do |kind, _topic|
          before = peer_subscribed?
          @peer_subscriptions += kind == :subscribe ? 1 : -1
          @peer_subscriptions = 0 if @peer_subscriptions.negative?
          if !before && peer_subscribed?
            @logger.info("tasker worker #{@worker_id}: orchestrator subscribed to results")
            @next_heartbeat_at = monotonic
          elsif before && !peer_subscribed?
            @logger.warn("tasker worker #{@worker_id}: orchestrator unsubscribed; holding results until it returns")
            @next_heartbeat_at = nil
          end
        end
      end

      def peer_subscribed?
        @peer_subscriptions.positive?
      end

      def current_capacity
        @paused || @stop_requested ? 0 : @max_workers
      end

      def receive_batches
        @sub.receive_many(max: 256, timeout_ms: 0).each { |frames| accept(frames) }
      end

      # One message from the batch socket. A batch for this worker runs the
      # steps it can and answers the rest with one batch_refusal, sent before
      # any of its partials; a body that cannot be read is refused whole.
      def accept(frames)
        msg = Protocol.decode(frames, strict_batch: false)
        return bad(:unexpected_type, "a #{msg['type']} message on the batch channel") unless msg["type"] == Protocol::BATCH
        return bad(:wrong_worker, "a batch for worker #{msg['worker_id']}") unless msg["worker_id"] == @worker_id

        run_batch(msg)
      rescue Protocol::MessageError => e
        bad(e.reason, e.message)
        refuse_unreadable(frames, e) if refusable?(frames, e)
      end

      # A body on this worker's topic that is not valid msgpack (or nests
      # too deep for the decoder), or a batch whose envelope is broken.
      def refusable?(frames, error)
        return false unless frames.is_a?(Array) && frames.size == 2 && frames[0].b == Protocol.batch_topic(@worker_id).b

        return true if error.reason == :undecodable

        error.reason == :invalid_field && Protocol::MsgpackScanner.new(frames[1]).top_level_string("type") == Protocol::BATCH
      rescue Protocol::MsgpackScanner::Stop
        false
      end

      def refuse_unreadable(frames, error)
        batch_id = Protocol.peek_batch_id(frames[1])
        @last_batch_id = batch_id if batch_id
        bump(:batches_received)
        message = "worker #{@worker_id} could not read batch #{batch_id || '(id unreadable)'}: #{error.message}"
        enqueue_refusal(batch_id, "undecodable", message, [])
      end

      def run_batch(msg)
        steps = msg["steps"]
        bump(:batches_received)
        bump(:steps_received, steps.size)
        @last_batch_id = msg["batch_id"]
        @result_limits = limits = @own_result_limits.merge(Protocol.batch_limits(msg))
        runnable = []
        refused = []
        steps.each_with_index do |step, index|
          reason, why = step_refusal(step, index, steps.size)
          if reason
            refused << [step, reason, why]
          else
            runnable << step
          end
        end
        refuse_steps(msg["batch_id"], refused) unless refused.empty?

        batch = BatchState.new(id: msg["batch_id"], steps: runnable, statuses: Array.new(runnable.size), reported: 0,
                               limits: limits)
        enqueue_completion(batch) if runnable.empty?
        runnable.each_with_index do |step, index|
          timeout = step["timeout_ms"].to_i.positive? ? step["timeout_ms"] / 1000.0 : @step_timeout_s
          job = Job.new(batch: batch, index: index, step: step, timeout_s: timeout, state: :queued)
          track_in_flight(job, step["step_id"], step["attempt"])
          @open_jobs << job
          @jobs << job
        end
      end

      # [reason, message] when this worker will not run the step, else nil.
      def step_refusal(step, index, count)
        if @max_batch_steps && index >= @max_batch_steps
          return ["too_many_steps", "batch of #{count} steps is over this worker's max_batch_steps of " \
                                    "#{@max_batch_steps}"]
        end
        if (problem = Protocol.step_problem(step, index))
          bad(:invalid_field, problem.message)
          return ["invalid_step", problem.message]
        end

        too_deep = payload_too_deep(step)
        return ["too_deep", too_deep] if too_deep

        missing = handler_missing(step["handler"])
        missing && ["unknown_handler", missing]
      end

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
        limit = @max_payload_depth
        return nil unless limit.is_a?(Integer)

        parts = [["context", step["context"]], ["handler_config", step["handler_config"]]]
        step["dependency_results"].each { |name, output| parts << ["the output of dependency #{name}", output] }
        parts.each do |what, value|
          # Decoded values nest at most Codec::MAX_DEPTH deep: measured exactly.
          depth = Payload.depth(value)
          next if depth <= limit

          return "worker #{@worker_id} refused the step: #{what} nests #{depth} levels, over max_payload_depth #{limit}"
        end
        nil
      end

      # One batch_refusal for the refused steps of a batch. A step whose
      # step_id or attempt cannot be read cannot be named: it is counted,
      # and the orchestrator takes it back when a heartbeat reports this
      # batch without it (docs/protocol.md section 6).
      def refuse_steps(batch_id, refused)
        entries = []
        refused.each do |step, reason, why|
          @stats_mutex.synchronize { @stats[:steps_refused][reason.to_sym] += 1 }
          if step.is_a?(Hash) && Protocol::INT.call(step["step_id"]) && Protocol::POS_INT.call(step["attempt"])
            entries << { step_id: step["step_id"], attempt: step["attempt"], reason: reason, message: why }
          else
            bump(:steps_refused_unnamed)
          end
        end
        return if entries.empty?

        reasons = entries.map { |e| e[:reason] }.tally
        why = reasons.size == 1 ? entries.first[:message] : reasons.map { |r, n| "#{n} #{r}" }.join(", ")
        message = "worker #{@worker_id} refused #{entries.size} step(s) of batch #{batch_id}: #{why}"
        enqueue_refusal(batch_id, reasons.max_by { |_r, n| n }.first, message, entries)
      end

      # Queued in the outbox ahead of the batch's partials. Its steps count
      # as in flight until it is sent, so no heartbeat reports them as
      # unknown to this worker before the orchestrator has the refusal.
      # A refusal over the orchestrator's result limit goes out in parts.
      def enqueue_refusal(batch_id, reason, message, entries)
        msg = Protocol.batch_refusal(batch_id: batch_id, worker_id: @worker_id, reason: reason, message: message,
                                     steps: entries)
        frames = Protocol.encode(msg)
        limit = result_limit(@result_limits)
        if limit && frames[1].bytesize > limit && entries.size > 1
          half = entries.size / 2
          enqueue_refusal(batch_id, reason, message, entries.first(half))
          enqueue_refusal(batch_id, reason, message, entries.drop(half))
          return
        end

        refused = entries.map do |e|
          token = [e[:step_id], e[:attempt]]
          track_in_flight(token, e[:step_id], e[:attempt])
          token
        end
        @outbox << Outgoing.new(frames: frames, kind: :refusal, refused: refused)
        return unless @logged_reasons.add?(:"refused_#{reason}")

        @logger.warn("tasker worker #{@worker_id}: #{message}; further #{reason} refusals are only counted")
      end

      def track_in_flight(token, step_id, attempt)
        @unreported[token] = [step_id, attempt]
        @in_flight = @unreported.size
      end

      def untrack_in_flight(token)
        @unreported.delete(token)
        @in_flight = @unreported.size
      end

      # Bad input is counted and logged once per reason: a misbehaving peer
      # must not be able to flood the log or stop the worker.
      def bad(reason, detail)
        @stats_mutex.synchronize { @stats[:bad_messages][reason] += 1 }
        return unless @logged_reasons.add?(reason)

        @logger.warn("tasker worker #{@worker_id}: dropped a bad message (#{reason}): #{detail}; " \
                     "further #{reason} messages are only counted")
      end

      def collect_results
        until @results.empty?
          out = @results.pop
          bump(out.kind == Protocol::STATUS_COMPLETE ? :steps_completed : :steps_failed)
          report(out)
        end
      end

      # Queues a step's one partial and, once every step of its batch has one
      # queued, the batch's completion behind them: the outbox is sent in order.
      def report(out)
        job = out.job
        return unless @open_jobs.delete?(job)

        @outbox << out
        log_partial(out)
        batch = job.batch
        batch.statuses[job.index] = out.kind
        batch.reported += 1
        enqueue_completion(batch) if batch.reported == batch.steps.size
      end

      # One line per attempt, when its partial is queued: each step at debug,
      # a failed attempt at warn with its error class and message, with the
      # step's fields (TaskerCore::Logging::Event).
      def log_partial(out)
        failed = out.kind != Protocol::STATUS_COMPLETE
        return unless failed || @logger.debug?

        step = out.job.step
        fields = { task_id: step["task_id"], step_id: step["step_id"], step_name: step["step_name"],
                   attempt: step["attempt"], worker_id: @worker_id }
        unless failed
          @logger.debug(Logging.event("tasker worker: step #{step['step_name']} complete", **fields))
          return
        end

        error = Protocol.decode(out.frames)["error"] || {}
        @logger.warn(Logging.event("tasker worker: step #{step['step_name']} failed: #{error['class']}: " \
                                   "#{error['message']}", **fields, error_class: error["class"],
                                                           retryable: error["retryable"]))
      rescue StandardError => e
        @logger.error("tasker worker #{@worker_id}: logging a step: #{e.class}: #{e.message}")
      end

      def enqueue_completion(batch)
        steps = batch.steps.each_with_index.map do |s, i|
          { step_id: s["step_id"], attempt: s["attempt"], status: batch.statuses[i] }
        end
        msg = Protocol.batch_completion(batch_id: batch.id, worker_id: @worker_id, steps: steps)
        @outbox << Outgoing.new(frames: Protocol.encode(msg), kind: :completion)
      end

      # The watchdog: report a step that ran past its deadline at once, then
      # interrupt its thread; replace a thread that ignores the interrupt.
      def watch_timeouts
        now = monotonic
        expired = []
        @mutex.synchronize do
          @running.each do |job|
            if job.state == :running && now >= job.deadline
              job.state = :timed_out
              job.grace_deadline = now + @timeout_grace_s
              job.thread.raise(TimeoutInterrupt)
              expired << job
            elsif job.state == :timed_out && job.grace_deadline && now >= job.grace_deadline
              abandon(job)
            end
          end
          @running.delete_if { |job| job.thread[:tc_abandoned] }
        end
        expired.each do |job|
          bump(:steps_timed_out)
          report_timeout(job, "step #{job.step['step_name']} (#{job.step['handler']}) exceeded its timeout of " \
                              "#{(job.timeout_s * 1000).round} ms")
        end
      end

      # Called with @mutex held.
      def abandon(job)
        thread = job.thread
        thread[:tc_abandoned] = true
        @pool.delete(thread)
        @pool << spawn_pool_thread unless @stop_requested
        bump(:threads_abandoned)
        @logger.warn("tasker worker #{@worker_id}: handler #{job.step['handler']} ignored its timeout; " \
                     "its thread is abandoned and replaced")
      end

      def report_timeout(job, message)
        error = Protocol.error_object(klass: TaskerCore::StepTimeoutError.name, message: message, retryable: true)
        msg = partial_for(job, error: error, started_at: job.started_at)
        bump(:steps_failed)
        report(Outgoing.new(frames: Protocol.encode(msg), kind: Protocol::STATUS_ERROR, job: job, error: error))
      end

      # Shutdown ran out of time: every step not yet reported fails, retryable.
      def shutdown_unfinished
        collect_results
        unfinished = []
        @mutex.synchronize do
          @open_jobs.each do |job|
            next unless %i[queued running].include?(job.state)

            job.thread&.raise(TimeoutInterrupt) if job.state == :running
            unfinished << [job, job.state]
            job.state = :timed_out
          end
        end
        unfinished.each do |job, was|
          bump(:steps_timed_out)
          report_timeout(job, was == :queued ? "worker shut down before the step started" : "worker shut down while the step ran")
        end
      end

      def send_heartbeat_if_due
        return unless @next_heartbeat_at && monotonic >= @next_heartbeat_at

        # A refused heartbeat is not retried: the next one supersedes it.
        bump(:heartbeats_sent) if @pub.send_parts(heartbeat_frames)
        @next_heartbeat_at = monotonic + @heartbeat_interval_s
      end

      def heartbeat_frames
        optional = { connection: connection_summary, limits: advertised_limits, last_batch_id: @last_batch_id,
                     in_flight_steps: @unreported.values }
        limit = result_limit(@result_limits)
        frames = nil
        [[], *HEARTBEAT_SHEDDING].each do |shed|
          shed.each { |key| optional.delete(key) }
          frames = Protocol.encode(Protocol.heartbeat(worker_id: @worker_id, capacity: current_capacity,
                                                      in_flight: @in_flight, **optional))
          return frames if limit.nil? || frames[1].bytesize <= limit

          next unless @logged_reasons.add?(:heartbeat_over_limit)

          @logger.warn("tasker worker #{@worker_id}: a heartbeat of #{frames[1].bytesize} bytes is over the " \
                       "orchestrator's result limit of #{limit} bytes; sending heartbeats with fewer optional fields")
        end
        frames # nothing smaller to send
      end

      # What this worker accepts in one batch (the heartbeat's "limits").
      def advertised_limits
        limits = { max_batch_steps: @max_batch_steps, max_message_bytes: @max_message_bytes,
                   max_payload_depth: @max_payload_depth }
        limits.values.all? { |v| v.is_a?(Integer) && v.positive? } ? limits : nil
      end

      # Sends the outbox in order. A message the publisher refuses at its
      # high-water mark stays at the head and is retried: results are never
      # dropped, and a completion never overtakes its batch's partials.
      def flush_outbox
        return unless peer_subscribed?

        @retry_at = nil
        until @outbox.empty?
          out = @outbox.first
          unless @pub.send_parts(out.frames)
            bump(:send_retries)
            @retry_at = monotonic + SEND_RETRY_S
            return
          end
          @outbox.shift
          case out.kind
          when :completion
            bump(:completions_sent)
          when :refusal
            out.refused.each { |token| untrack_in_flight(token) }
            bump(:refusals_sent)
          else
            untrack_in_flight(out.job)
            bump(:partials_sent)
          end
        end
      end

      def flush_until(deadline)
        until @outbox.empty? || monotonic >= deadline
          track_subscriptions
          flush_outbox
          TaskerCore::Socket.select([@pub], (SEND_RETRY_S * 1000).ceil) unless @outbox.empty?
        end
      end

      def bump(key, by = 1)
        @stats_mutex.synchronize { @stats[key] += by }
      end

      def monotonic
        Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end
    end
  end
end
