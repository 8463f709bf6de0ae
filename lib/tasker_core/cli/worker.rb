# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker worker --handlers PATH (TaskerCore::WorkerProcess; exe/tasker-worker is the same)
    class Worker < Command
      include RailsApp

      DESCRIPTION = <<~TEXT.chomp
        Runs a worker in the foreground: it connects to the orchestrator's endpoints
        (zeromq.batch_endpoint / zeromq.result_endpoint) and runs the steps it is sent.
        In a Rails app (config/environment.rb here, or --app DIR) it boots the app first:
        handlers autoload from app/handlers, no --handlers needed.
        Signals: TERM/INT drain running steps and exit 0; TSTP stops taking work; CONT resumes.
      TEXT

      private

      def define_options(o)
        @options[:handlers] = []
        o.on("--handlers PATH", "a .rb file or a directory of them defining step handlers (repeatable; " \
                                "required outside a Rails app)") { |v| @options[:handlers] << v }
        define_app_option(o)
        o.on("--concurrency N", Integer, "threads running steps (default worker.max_workers)") { |v| @options[:concurrency] = v }
        o.on("--batch-endpoint E", "where the orchestrator publishes batches") { |v| @options[:batch_endpoint] = v }
        o.on("--result-endpoint E", "where the orchestrator receives results") { |v| @options[:result_endpoint] = v }
        o.on("--worker-id ID", "this worker's id (default host-pid-random)") { |v| @options[:worker_id] = v }
        o.on("--shutdown-timeout SECONDS", Float, "how long TERM waits for running steps") { |v| @options[:shutdown_timeout] = v }
      end

      def call(_args)
        raise UsageError, "--handlers PATH is required outside a Rails app" if @options[:handlers].empty? && !rails_app?
        raise UsageError, "--concurrency must be at least 1" if @options[:concurrency]&.< 1

        @options[:handlers].each do |path|
          raise Error, "--handlers #{path}: no such file or directory" unless File.exist?(path)
        end
        WorkerProcess.new(**@options.slice(:handlers, :concurrency, :batch_endpoint, :result_endpoint, :worker_id,
                                           :shutdown_timeout)).run
      end
    end
  end
end
