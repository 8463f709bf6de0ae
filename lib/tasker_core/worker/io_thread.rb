# frozen_string_literal: true

module TaskerCore
  module Worker
    # The loop of the I/O thread. Each wake-up moves data one way:
    #   batch socket -> Intake -> Ledger (opened) -> Executor (jobs)
    #   Executor (finished partials) + watchdog timeouts -> Ledger (reported)
    #     -> Connection outbox -> result socket -> Ledger (sent)
    # and a heartbeat from the Ledger's counts when one is due.
    class IoThread
      # Upper bound of one wait, so a missed wake-up costs at most this much.
      MAX_WAIT_S = 1.0

      # The exception that ended the loop, if one did.
      attr_reader :error

      def initialize(settings:, connection:, ledger:, intake:, executor:, partials:, heartbeat:, stats:, logger:)
        @settings = settings
        @worker_id = settings.worker_id
        @connection = connection
        @ledger = ledger
        @intake = intake
        @executor = executor
        @partials = partials
        @heartbeat = heartbeat
        @stats = stats
        @logger = logger
        @paused = false
        @stop_timeout_s = nil # set by #request_stop
      end

      # ---- other threads ----------------------------------------------------

      def paused? = @paused

      def paused=(value)
        @paused = value
        @connection.wake
      end

      def stop_requested? = !@stop_timeout_s.nil?

      def request_stop(timeout_s)
        @stop_timeout_s = timeout_s
        @executor.stopping!
        @connection.wake
      end

      # ---- the I/O thread ---------------------------------------------------

      # The thread's body: opens the connection (ready gets :ok or the
      # exception that prevented it), then loops until stopped and drained.
      def run(ready)
        begin
          @connection.open
        rescue Exception => e # rubocop:disable Lint/RescueException
          ready << e
          return
        end
        ready << :ok
        @logger.info("tasker worker #{@worker_id}: #{@settings.max_workers} threads (capacity #{@settings.capacity}), batches from " \
                     "#{@connection.endpoints[:batch_endpoint]}, results to #{@connection.endpoints[:result_endpoint]}")
        loop_until_drained
        @connection.finish
        @logger.info("tasker worker #{@worker_id}: stopped")
      rescue Exception => e # rubocop:disable Lint/RescueException
        # Kept rather than re-raised so #stop's join returns; see #error.
        @error = e
        @logger.error("tasker worker #{@worker_id}: I/O thread failed: #{e.class}: #{e.message}\n" \
                      "#{Array(e.backtrace).first(10).join("\n")}")
      ensure
        @connection.close
      end

      private

      def loop_until_drained
        advertised_capacity = nil
        drain_deadline = nil
        loop do
          batches_waiting = @connection.wait(wait_ms(drain_deadline))
          if @connection.apply_endpoint_change { |frames| accept(frames) }
            # The new orchestrator sent none of the batches received so far.
            @ledger.new_orchestrator
            batches_waiting = false
          end
          @connection.record_socket_events
          @connection.reopen_dead_sockets { |frames| accept(frames) }
          if stop_requested? && drain_deadline.nil?
            drain_deadline = monotonic + @stop_timeout_s
            hand_back_queued
          end
          @connection.track_subscriptions
          @connection.receive_batches.each { |frames| accept(frames) } if batches_waiting
          collect_results
          @executor.expire(monotonic).each { |job, message| report_timeout(job, message) }
          capacity = current_capacity
          if capacity != advertised_capacity && @connection.peer_subscribed?
            # Pause, resume and drain take effect at the orchestrator now,
            # not one heartbeat interval later.
            @connection.heartbeat_now!
            advertised_capacity = capacity
          end
          # Flushed before the heartbeat too, so the heartbeat's in-flight
          # list reflects as much as possible of what was reported.
          flush
          if @connection.heartbeat_due?
            @connection.send_heartbeat(@heartbeat.frames(capacity: capacity, connection: @connection.summary))
          end
          flush

          next unless drain_deadline
          break if @ledger.in_flight.zero? && @connection.outbox.empty?

          if monotonic >= drain_deadline
            shutdown_unfinished
            @connection.flush_until(monotonic + (@settings.linger_ms / 1000.0)) { |sent| sent.each { |o| @ledger.sent(o) } }
            break
          end
        end
      end

      def accept(frames)
        jobs, outgoing = @intake.accept(frames)
        @connection.outbox.concat(outgoing)
        @executor.submit(jobs) unless jobs.empty?
      end

      def collect_results
        finished = @executor.finished
        return if finished.empty?

        completed = 0
        finished.each do |out|
          completed += 1 if out.kind == Protocol::STATUS_COMPLETE
          report(out)
        end
        @stats.bump(:steps_completed, completed) if completed.positive?
        @stats.bump(:steps_failed, finished.size - completed) if completed < finished.size
      end

      # Queues a step's one partial and, once every step of its batch has one
      # queued, the batch's completion behind them: the outbox is sent in order.
      def report(out)
        queued = @ledger.report(out)
        return if queued.empty?

        @connection.outbox.concat(queued)
        log_partial(out)
      end

      def report_timeout(job, message)
        @stats.bump(:steps_timed_out)
        @stats.bump(:steps_failed)
        report(@partials.timeout(job, message))
      end

      # Draining: steps queued and not started go back to the orchestrator
      # now, refused as draining (neither a lost attempt nor a failure), and so will any that
      # still arrive; the running ones finish within the stop timeout.
      def hand_back_queued
        @intake.draining!
        jobs = @executor.withdraw_queued
        refusals = jobs.empty? ? [] : @intake.hand_back(jobs)
        # each batch's refusal before its completion
        @connection.outbox.concat(refusals + @ledger.withdraw(jobs))
        @logger.info("tasker worker #{@worker_id}: draining #{@ledger.open_jobs.size} running step(s); " \
                     "#{jobs.size} not started handed back")
      end

      # Shutdown ran out of time: every step not yet reported fails, retryable.
      def shutdown_unfinished
        collect_results
        @executor.give_up(@ledger.open_jobs).each { |job, message| report_timeout(job, message) }
      end

      def flush
        @connection.flush.each { |out| @ledger.sent(out) }
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
        return @logger.debug(Logging.event("tasker worker: step #{step['step_name']} complete", **fields)) unless failed

        error = out.error || {}
        @logger.warn(Logging.event("tasker worker: step #{step['step_name']} failed: #{error['class']}: " \
                                   "#{error['message']}", **fields, error_class: error["class"],
                                                           retryable: error["retryable"]))
      rescue StandardError => e
        @logger.error("tasker worker #{@worker_id}: logging a step: #{e.class}: #{e.message}")
      end

      def current_capacity
        @paused || stop_requested? ? 0 : @settings.capacity
      end

      def wait_ms(drain_deadline)
        return 0 if @executor.results_ready?

        now = monotonic
        wake_at = [now + MAX_WAIT_S, @connection.next_due_at, drain_deadline].compact.min
        [((@executor.next_wake_at(wake_at) - now) * 1000).ceil, 0].max
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
