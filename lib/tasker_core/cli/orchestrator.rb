# frozen_string_literal: true

require "socket"

module TaskerCore
  class CLI
    # tasker orchestrator: the native orchestration loop in the foreground.
    class Orchestrator < Command
      include RailsApp

      DESCRIPTION = <<~TEXT.chomp
        Runs the orchestration loop in the foreground (in a Rails app, config/environment.rb here
        or --app DIR, it boots the app first): it binds zeromq.batch_endpoint and
        zeromq.result_endpoint, claims ready steps from the database in batches, sends them to
        live workers and writes their results back. Several may share one database.
        Signals: TERM/INT stop the loop cleanly (results written back, in-flight steps released) and exit 0;
        a second TERM/INT exits at once (130). Logs go through TaskerCore.logger (logging.level, logging.format).
      TEXT
      SIGNALS = %w[TERM INT].freeze
      # How often the foreground loop wakes to look at the loop's counters.
      WAKE_S = 0.5

      private

      def define_options(o)
        define_app_option(o)
        o.on("--batch-size N", Integer, "most steps claimed and sent per batch (default orchestration.batch_size)") { |v| @options[:batch_size] = v }
        o.on("--poll-interval-ms MS", Integer, "how often the loop looks for ready steps when idle (default 50)") { |v| @options[:poll_interval_ms] = v }
        o.on("--owner NAME", "the name this orchestrator claims steps under (default host-pid-random)") { |v| @options[:owner] = v }
        o.on("--metrics-port N", Integer, "serve Prometheus metrics on 127.0.0.1:N/metrics (0 = any free port)") { |v| @options[:metrics_port] = v }
        o.on("--stats-interval SECONDS", Float, "log the loop's counters at most this often, when they changed " \
                                                "(default 10; 0 = never)") { |v| @options[:stats_interval] = v }
      end

      def call(_args)
        url = database_url!
        manager = Internal::OrchestrationManager.instance
        unless manager.respond_to?(:start_orchestration)
          raise Error, "this build of tasker_core has no orchestration loop (OrchestrationManager#start_orchestration)"
        end

        signal_r, signal_w = IO.pipe
        previous = SIGNALS.to_h { |s| [s, trap(s) { signal_w.write_nonblock(s[0], exception: false) }] }
        # "" = libpq's PG* variables: let the loop resolve the URL itself then.
        opts = { database_url: url.empty? ? nil : url }.compact.merge(@options.slice(:batch_size, :poll_interval_ms, :owner))
        manager.start_orchestration(**opts)
        metrics = start_metrics if @options.key?(:metrics_port)
        zmq = config.zeromq
        logger.info("tasker orchestrator: running (pid #{Process.pid}; batches on #{zmq['batch_endpoint']}, " \
                    "results on #{zmq['result_endpoint']}); TERM or INT stops it")
        status = wait(signal_r, manager)
        stop(manager)
        logger.info("tasker orchestrator: stopped (#{summary(manager)})")
        status
      ensure
        metrics&.stop
        previous&.each { |s, h| trap(s, h || "DEFAULT") }
        signal_r&.close
        signal_w&.close
      end

      def logger = TaskerCore.logger

      # Stopping writes back the results the loop has and releases the steps
      # still out with workers (OrchestrationHandle#stop_orchestration). A
      # second TERM/INT meanwhile exits at once: what was not released yet is
      # claimed again by any orchestrator when its claim deadline (the
      # step's timeout plus orchestration.dispatch_timeout_ms) passes.
      def stop(manager)
        # Raised in the main thread by the trap, wherever it is (the native
        # join included: it wakes for interrupts).
        SIGNALS.each { |s| trap(s) { raise HardStop, s } }
        logger.info("tasker orchestrator: stopping (writing back results, releasing in-flight steps); " \
                    "TERM or INT again exits at once")
        manager.stop_orchestration
      rescue HardStop => e
        logger.warn("tasker orchestrator: second #{e.message}: exiting at once; steps still claimed return to " \
                    "the queue at their claim deadline")
        Process.exit!(EXIT_INTERRUPTED)
      end

      # A second TERM/INT while stopping; not a StandardError, so nothing on
      # the way swallows it.
      class HardStop < Exception; end # rubocop:disable Lint/InheritException

      # Until a signal (-> 0) or the loop stopping by itself (-> 1). The
      # counters are logged when they changed, at most every --stats-interval
      # seconds: an idle orchestrator writes nothing.
      def wait(signal_r, manager)
        interval = @options.fetch(:stats_interval, 10.0)
        next_stats = now + interval
        last = summary(manager)
        loop do
          return EXIT_OK if IO.select([signal_r], nil, nil, WAKE_S) && signal_r.read_nonblock(16, exception: false)

          unless manager.orchestrating?
            logger.error("tasker orchestrator: the orchestration loop stopped by itself (#{summary(manager)})")
            return EXIT_FAILURE
          end
          next unless interval.positive? && now >= next_stats

          current = summary(manager)
          next if current == last

          logger.info("tasker orchestrator: #{current}")
          last = current
          next_stats = now + interval
        end
      end

      def summary(manager)
        stats = manager.respond_to?(:orchestration_handle) ? manager.orchestration_handle.stats : {}
        loop_stats = stats["loop"] || stats[:loop] || {}
        %w[claimed dispatched completed failed retried redispatched handed_back_draining lost_failed isolated isolation_drains failed_too_large failed_too_deep
           timed_out db_errors].filter_map do |k|
          "#{k} #{loop_stats[k]}" if loop_stats.key?(k)
        end.join(", ").then { |s| s.empty? ? "no counters" : s }
      rescue StandardError => e
        "counters unavailable: #{e.message}"
      end

      def start_metrics
        require_relative "../web"
        TaskerCore::Web::Metrics.serve(port: @options[:metrics_port]).tap do |server|
          err.puts "tasker orchestrator: Prometheus metrics on #{server.url}/metrics"
        end
      end

      def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
