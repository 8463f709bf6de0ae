# frozen_string_literal: true

require "socket"

module TaskerCore
  class CLI
    # tasker orchestrator: the native orchestration loop in the foreground.
    class Orchestrator < Command
      DESCRIPTION = <<~TEXT.chomp
        Runs the orchestration loop in the foreground: it binds zeromq.batch_endpoint and
        zeromq.result_endpoint, claims ready steps from the database in batches, sends them to
        live workers and writes their results back. Run one per database.
        Signals: TERM/INT stop the loop cleanly (in-flight steps are re-dispatched later) and exit 0.
      TEXT
      SIGNALS = %w[TERM INT].freeze

      private

      def define_options(o)
        o.on("--batch-size N", Integer, "most steps claimed and sent per batch (default orchestration.batch_size)") { |v| @options[:batch_size] = v }
        o.on("--poll-interval-ms MS", Integer, "how often the loop looks for ready steps when idle (default 50)") { |v| @options[:poll_interval_ms] = v }
        o.on("--owner NAME", "the name this orchestrator claims steps under (default host-pid-random)") { |v| @options[:owner] = v }
        o.on("--metrics-port N", Integer, "serve Prometheus metrics on 127.0.0.1:N/metrics (0 = any free port)") { |v| @options[:metrics_port] = v }
        o.on("--stats-interval SECONDS", Float, "log the loop's counters this often (default 10; 0 = never)") { |v| @options[:stats_interval] = v }
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
        err.puts "tasker orchestrator: running (pid #{Process.pid}; batches on #{zmq['batch_endpoint']}, " \
                 "results on #{zmq['result_endpoint']}); TERM or INT stops it"
        err.flush
        status = wait(signal_r, manager)
        manager.stop_orchestration
        err.puts "tasker orchestrator: stopped (#{summary(manager)})"
        status
      ensure
        metrics&.stop
        previous&.each { |s, h| trap(s, h || "DEFAULT") }
        signal_r&.close
        signal_w&.close
      end

      # Until a signal (-> 0) or the loop stopping by itself (-> 1).
      def wait(signal_r, manager)
        interval = @options.fetch(:stats_interval, 10.0)
        next_stats = interval.positive? ? now + interval : nil
        loop do
          return EXIT_OK if IO.select([signal_r], nil, nil, 0.5) && signal_r.read_nonblock(16, exception: false)

          unless manager.orchestrating?
            err.puts "tasker orchestrator: the orchestration loop stopped by itself (#{summary(manager)})"
            return EXIT_FAILURE
          end
          if next_stats && now >= next_stats
            err.puts "tasker orchestrator: #{summary(manager)}"
            err.flush
            next_stats = now + interval
          end
        end
      end

      def summary(manager)
        stats = manager.respond_to?(:orchestration_handle) ? manager.orchestration_handle.stats : {}
        loop_stats = stats["loop"] || stats[:loop] || {}
        %w[claimed dispatched completed failed retried timed_out db_errors].filter_map do |k|
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
