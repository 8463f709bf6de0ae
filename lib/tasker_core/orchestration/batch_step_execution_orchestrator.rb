# frozen_string_literal: true

require "logger"
require_relative "../worker/settings"
require_relative "../worker/records"
require_relative "../worker/stats"
require_relative "../worker/ledger"
require_relative "../worker/partials"
require_relative "../worker/intake"
require_relative "../worker/heartbeat"
require_relative "../worker/executor"
require_relative "../worker/links"
require_relative "../worker/connection"
require_relative "../worker/io_thread"

module TaskerCore
  module Orchestration
    # The worker side of wire protocol v1 (docs/protocol.md): receives batches
    # addressed to this worker, runs their steps on a fixed thread pool and
    # streams one partial_result per step, then one batch_completion per batch.
    #
    # This class is the worker's public face; the parts, in
    # lib/tasker_core/worker/, each do one job:
    # - Worker::Settings: everything configured, built once here, frozen.
    # - Worker::Connection: both sockets, the outbox, heartbeat timing,
    #   reopening and moving (discovery). Owned by the I/O thread.
    # - Worker::Intake: reads batches, refuses what it cannot run.
    # - Worker::Executor: the pool threads, handlers, deadlines.
    # - Worker::Ledger: what is in flight (counts are derived from it).
    # - Worker::IoThread: the I/O thread's loop that moves data between them.
    class BatchStepExecutionOrchestrator
      TimeoutInterrupt = Worker::Executor::TimeoutInterrupt
      TIMEOUT_GRACE_S = Worker::Settings::TIMEOUT_GRACE_S
      REOPEN_GRACE_S = Worker::Settings::REOPEN_GRACE_S

      # The frozen Worker::Settings this worker runs with.
      attr_reader :settings

      # Keywords (each defaults to its configuration key): step_sub_endpoint
      # (zeromq.batch_endpoint), result_pub_endpoint (zeromq.result_endpoint),
      # max_workers, heartbeat_interval_ms, step_timeout_ms,
      # shutdown_timeout_ms, send_hwm, recv_hwm, linger_ms, max_message_bytes,
      # max_batch_steps, max_payload_depth, max_result_bytes; curve (:config,
      # nil or {server_key:, public_key:, secret_key:}); worker_id (default
      # generated); timeout_grace_s; reopen_grace_s.
      def initialize(handler_registry: TaskerCore::HandlerRegistry.default, logger: nil, **settings)
        @settings = Worker::Settings.build(**settings)
        @registry = handler_registry
        @logger = logger || (TaskerCore.respond_to?(:logger) && TaskerCore.logger) || Logger.new($stderr)
        @stats = Worker::Stats.new(logger: @logger, worker_id: worker_id)
        @ledger = Worker::Ledger.new(@settings)
        @connection = Worker::Connection.new(settings: @settings, stats: @stats, logger: @logger)
        @thread = nil
      end

      def worker_id = @settings.worker_id

      def max_workers = @settings.max_workers

      # Connects and starts the I/O thread and the pool. Raises the error the
      # I/O thread met while opening its sockets (a bad endpoint, say).
      def start
        raise TaskerCore::Error, "worker #{worker_id} already started" if @thread

        partials = Worker::Partials.new(worker_id: worker_id, stats: @stats)
        @executor = Worker::Executor.new(settings: @settings, registry: @registry, partials: partials, stats: @stats,
                                         logger: @logger, wake: @connection.method(:wake))
        intake = Worker::Intake.new(settings: @settings, registry: @registry, ledger: @ledger, stats: @stats,
                                    logger: @logger)
        heartbeat = Worker::Heartbeat.new(settings: @settings, ledger: @ledger, stats: @stats)
        @io = Worker::IoThread.new(settings: @settings, connection: @connection, ledger: @ledger, intake: intake,
                                   executor: @executor, partials: partials, heartbeat: heartbeat, stats: @stats,
                                   logger: @logger)
        @io.paused = true if @paused
        ready = Thread::Queue.new
        @thread = Thread.new { @io.run(ready) }
        @thread.name = "tasker-worker-io"
        outcome = ready.pop
        if outcome.is_a?(Exception)
          @thread.join
          @thread = nil
          raise outcome
        end
        @executor.start
        self
      end

      # Moves both sockets to new endpoints (a new orchestrator took over).
      # Accepted steps keep running; results not yet sent go to the new one.
      def reconnect(batch_endpoint:, result_endpoint:)
        @connection.move_to(batch_endpoint, result_endpoint)
        self
      end

      def endpoints = @connection.endpoints

      # [{socket: :batch|:result, event:, endpoint:, at:}], oldest first.
      def connection_history = @connection.history

      # {"connects", "disconnects", "last_event", "last_event_at"} since start.
      def connection_summary = @connection.summary

      # Never shows the CURVE secret key.
      def inspect
        "#<#{self.class.name} worker_id=#{worker_id.inspect} max_workers=#{max_workers} curve=#{!@settings.curve.nil?}>"
      end

      # The exception that ended the I/O thread, if one did.
      def error = @io&.error

      def running?
        !@thread.nil? && @thread.alive? && !@io.stop_requested?
      end

      # Stops taking work: heartbeats advertise capacity 0, so a credit-based
      # orchestrator sends nothing more. Batches already sent are still run.
      def pause
        @paused = true
        @io.paused = true if @io
        self
      end

      def resume
        @paused = false
        @io.paused = false if @io
        self
      end

      def paused? = @paused ? true : false

      # Drains: advertises capacity 0, finishes (or times out) every accepted
      # step, sends every partial and completion, says goodbye and closes.
      # Steps still unfinished after `timeout` are reported as failed with
      # StepTimeoutError, retryable. Returns true when the I/O thread ended.
      def stop(timeout: @settings.shutdown_timeout_s)
        return true unless @thread

        @io.request_stop(timeout)
        finished = @thread.join(timeout + (@settings.linger_ms / 1000.0) + 5)
        @executor.join
        !finished.nil?
      end

      def stats
        @stats.to_h.merge(in_flight: @ledger.in_flight, worker_id: worker_id,
                          peer_subscribed: @connection.peer_subscribed?, endpoints: endpoints,
                          connection_history: connection_history)
      end
    end
  end
end
