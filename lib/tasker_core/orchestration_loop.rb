# frozen_string_literal: true

require "securerandom"
require "socket"
require_relative "queues"

module TaskerCore
  # The native orchestration loop's Ruby face: defaults from config for
  # OrchestrationHandle#start_orchestration (the loop itself is C, in
  # ext/tasker_core/orchestration_loop.c, and runs no Ruby).
  class OrchestrationHandle
    # How often the stats poller reads #stats while the loop runs: reading
    # them is what logs the handle's once-per-reason warnings.
    STATS_POLL_INTERVAL_S = 1.0

    # Starts a native thread that takes over this handle's sockets and opens
    # its own PostgreSQL connection: it claims ready steps, sends them to
    # live workers by free capacity, and writes results back in batches.
    # While it runs, #publish_batch and #receive_results raise; #workers and
    # #stats ("loop" key) stay available from any thread. A Ruby thread
    # reads #stats about once a second meanwhile (see StatsPoller).
    #
    # max_lost_attempts: lost attempts (worker lost, lease expired, batch
    # refused) before a step fails with StepLostError
    # (orchestration.max_lost_attempts).
    #
    # queue_limits: { "api" => 5 }: at most that many steps of the queue in
    # flight across every orchestrator on the database (config queues.<name>.concurrency).
    def start_orchestration(database_url: nil, owner: nil, batch_size: nil, lease_ms: nil, poll_interval_ms: 50,
                            max_lost_attempts: nil, queue_limits: nil)
      url = database_url || self.class.configured_database_url
      if url.nil? || url.empty?
        raise ConfigurationError, "no database to orchestrate from: set DATABASE_URL (or database.url in the " \
                                  "config), e.g. to the embedded cluster bin/setup starts"
      end

      orchestration = TaskerCore.respond_to?(:config) ? (TaskerCore.config.orchestration || {}) : {}
      queue_limits ||= self.class.configured_queue_limits
      _start_orchestration(url, owner || self.class.default_owner,
                           Integer(batch_size || orchestration.fetch("batch_size", 100)),
                           Integer(lease_ms || orchestration.fetch("dispatch_timeout_ms", 10_000)),
                           Integer(poll_interval_ms),
                           Integer(max_lost_attempts || orchestration.fetch("max_lost_attempts", 5)),
                           *self.class.queue_limit_literals(queue_limits))
      @stats_poller&.stop
      @stats_poller = StatsPoller.start(self)
      self
    end

    unless private_method_defined?(:_stop_orchestration_native)
      alias _stop_orchestration_native stop_orchestration
      private :_stop_orchestration_native
    end

    # See the C binding: stops the loop and joins it; also stops the stats poller.
    def stop_orchestration(**opts)
      _stop_orchestration_native(**opts)
    ensure
      @stats_poller&.stop unless orchestrating?
    end

    # Reads the handle's stats while its loop runs, so the binding's
    # once-per-reason warnings (bad messages, workers not reading, ...) are
    # logged within a second, and logs the CURVE refusals the ZAP handler
    # saw (TaskerCore::Curve.log_refusals). Exits by itself when the loop
    # stops.
    class StatsPoller
      def self.start(handle, interval: STATS_POLL_INTERVAL_S) = new(handle, interval).tap(&:start)

      def initialize(handle, interval)
        @handle = handle
        @interval = interval
        @lock = Mutex.new
        @wake = ConditionVariable.new
        @stopping = false
      end

      def start
        @thread = Thread.new { run }
        @thread.name = "tasker-stats" if @thread.respond_to?(:name=)
        @thread.report_on_exception = false
      end

      def stop
        @lock.synchronize do
          @stopping = true
          @wake.signal
        end
        @thread.join(5) unless Thread.current == @thread
      end

      private

      def run
        until stopping?
          break if @handle.closed? || !@handle.orchestrating?

          poll
          @lock.synchronize { @wake.wait(@lock, @interval) unless @stopping }
        end
      end

      def poll
        @handle.stats
        curve = defined?(TaskerCore::Curve) && TaskerCore::Curve
        curve.log_refusals(TaskerCore.logger) if curve.respond_to?(:log_refusals)
      rescue StandardError => e
        TaskerCore.logger.debug { "tasker_core stats poller: #{e.class}: #{e.message}" }
      end

      def stopping? = @lock.synchronize { @stopping }
    end

    class << self
      def configured_database_url
        url = TaskerCore.config.dig("database", "url") if TaskerCore.respond_to?(:config)
        url = ENV["DATABASE_URL"] if url.nil? || url.empty?
        url
      end

      def configured_queue_limits = TaskerCore.respond_to?(:config) ? Queues.configured_limits : {}

      # The claim's two array literals (text[] and int[]) for queue_limits.
      def queue_limit_literals(limits)
        limits = limits.to_h { |q, n| [q.to_s, n] }
        bad = limits.find { |q, n| !Queues.name?(q) || !(n.is_a?(Integer) && n >= 1) }
        raise ArgumentError, "queue_limits: expected queue names => Integers >= 1, got #{bad.inspect}" if bad

        [Store::ParamEncoding.encode(limits.keys), Store::ParamEncoding.encode(limits.values)]
      end

      # Unique per process and start, so two orchestrators never share claims.
      def default_owner = "#{::Socket.gethostname[0, 60]}-#{Process.pid}-#{SecureRandom.hex(4)}"
    end
  end
end
