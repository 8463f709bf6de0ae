# frozen_string_literal: true

module TaskerCore
  module Internal
    # Owns the process's one OrchestrationHandle: the handle binds the batch
    # and result endpoints, and a second binder in the same process would
    # fail, so everything that orchestrates goes through this singleton.
    #
    # Fork-aware: a child process gets a fresh manager (and so a fresh
    # handle on first use); the parent's handle is left alone in the child,
    # where using it would raise ForkSafetyError and GC only forgets it.
    class OrchestrationManager
      @instance = nil
      @instance_pid = nil
      @lock = Mutex.new

      class << self
        def instance
          @lock.synchronize do
            if @instance.nil? || @instance_pid != Process.pid
              @instance = new
              @instance_pid = Process.pid
            end
            @instance
          end
        end
      end

      def initialize
        @lock = Mutex.new
        @handle = nil
        @sweeper = nil
        @recurring = nil
        @pid = Process.pid
      end

      # The handle, built from zeromq.* config on first use.
      def orchestration_handle
        @lock.synchronize do
          forget_inherited_handle
          @handle ||= OrchestrationHandle.new(**handle_options)
        end
      end

      def handle_built?
        @lock.synchronize do
          forget_inherited_handle
          !@handle.nil?
        end
      end

      # Closes the handle; the next #orchestration_handle builds a new one
      # (with the configuration as it is then).
      def close
        @lock.synchronize do
          forget_inherited_handle
          @handle&.close
          @handle = nil
        end
        nil
      end
      alias reset! close

      # Starts the native orchestration loop on this process's handle (see
      # OrchestrationHandle#start_orchestration). The database is
      # database.url / DATABASE_URL unless database_url: is given; with
      # none, raises ConfigurationError: the tooling (bin/setup, bin/test),
      # not the library, starts an embedded PostgreSQL.
      #
      # When discovery.name is set (or discovery: { name: } is given), the
      # handle's endpoints are registered under that name in PostgreSQL once
      # the loop runs, and revoked when it stops (TaskerCore::Discovery).
      def start_orchestration(discovery: {}, **opts)
        url = opts[:database_url] || OrchestrationHandle.configured_database_url
        if url.nil? || url.empty?
          raise ConfigurationError, "no database configured for the orchestration loop: set DATABASE_URL " \
                                    "(or database.url in config/tasker-config.yml)"
        end

        # Bad recurring entries (an unknown template, a context it refuses) stop the start here.
        recurring = TaskerCore::Recurring::Scheduler.from_config
        handle = orchestration_handle
        handle.start_orchestration(**opts, database_url: url)
        begin
          TaskerCore::Discovery.on_orchestration_started(handle, **discovery)
        rescue StandardError
          handle.stop_orchestration
          raise
        end
        start_retention(url)
        start_recurring(recurring)
        self
      end

      def stop_orchestration(timeout_ms: 10_000)
        stop_recurring
        stop_retention
        TaskerCore::Discovery.on_orchestration_stopping
        handle = @lock.synchronize do
          forget_inherited_handle
          @handle
        end
        handle.nil? || handle.closed? ? true : handle.stop_orchestration(timeout_ms: timeout_ms)
      end

      def orchestrating?
        handle = @lock.synchronize do
          forget_inherited_handle
          @handle
        end
        !handle.nil? && !handle.closed? && handle.orchestrating?
      end

      # The keyword arguments OrchestrationHandle.new gets, from zeromq.* in
      # TaskerCore.config.
      def handle_options
        zeromq = TaskerCore.config.zeromq
        {
          enabled: zeromq.fetch("enabled"),
          batch_endpoint: zeromq.fetch("batch_endpoint"),
          result_endpoint: zeromq.fetch("result_endpoint"),
          send_hwm: zeromq.fetch("send_hwm"),
          recv_hwm: zeromq.fetch("recv_hwm"),
          linger_ms: zeromq.fetch("linger_ms"),
          heartbeat_timeout_ms: zeromq.fetch("heartbeat_timeout_ms"),
          max_payload_depth: zeromq.fetch("max_payload_depth")
        }.merge(security_options)
      end

      private

      # The periodic cleanup of finished tasks (retention.finished_after;
      # TaskerCore::Retention), a Ruby thread beside the native loop.
      def start_retention(url)
        sweeper = TaskerCore::Retention::Sweeper.from_config(url: url)&.start
        old = @lock.synchronize { @sweeper.tap { @sweeper = sweeper } }
        old&.stop
      end

      def stop_retention
        sweeper = @lock.synchronize { @sweeper.tap { @sweeper = nil } }
        sweeper&.stop
      end

      # The recurring tasks (TaskerCore::Recurring::Scheduler), a Ruby
      # thread beside the native loop; scheduler is nil without any.
      def start_recurring(scheduler)
        scheduler&.start
        old = @lock.synchronize { @recurring.tap { @recurring = scheduler } }
        old&.stop
      end

      def stop_recurring
        scheduler = @lock.synchronize { @recurring.tap { @recurring = nil } }
        scheduler&.stop
      end

      public

      # The running recurring-task scheduler, or nil.
      def recurring_scheduler = @lock.synchronize { @recurring }

      private

      # CURVE keys, allow-list and message limits (docs/security.md).
      def security_options
        return {} unless TaskerCore.config.dig("zeromq", "enabled")

        TaskerCore::Curve.handle_options(TaskerCore.config)
      end

      # The instance itself may have crossed a fork when someone kept a
      # reference to it: never touch the parent's handle here.
      def forget_inherited_handle
        return if @pid == Process.pid

        @handle = nil
        @pid = Process.pid
      end
    end
  end
end
