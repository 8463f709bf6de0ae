# frozen_string_literal: true

require "optparse"
require "logger"

module TaskerCore
  # A worker in the foreground: exe/tasker-worker and `tasker worker` (which
  # also boots a Rails app) parse the same options (.define_options), check
  # them the same way (.validate!) and run #run. Signals, as in the job
  # systems users know:
  #   TERM, INT  drain (finish or time out accepted steps, send their results,
  #              say goodbye) and exit 0
  #   TSTP       stop taking new work (heartbeats advertise capacity 0)
  #   CONT       take work again
  class WorkerProcess
    USAGE = "Usage: tasker-worker --handlers PATH [--concurrency N] [--prefetch N] [--batch-endpoint E] " \
            "[--result-endpoint E] [--discovery NAME] [--worker-id ID] [--shutdown-timeout SECONDS] [--queues A,B]"
    # The keywords of #initialize that come from the command line.
    OPTIONS = %i[handlers concurrency prefetch batch_endpoint result_endpoint discovery worker_id shutdown_timeout
                 queues].freeze

    SIGNAL_BYTES = { "TERM" => "T", "INT" => "I", "TSTP" => "S", "CONT" => "C" }.freeze

    def self.run(argv, logger: nil)
      options = parse(argv)
      new(**options, logger: logger).run
    rescue OptionParser::ParseError, ArgumentError => e
      warn "tasker-worker: #{e.message}\n#{USAGE}"
      2
    rescue ScriptError, StandardError => e
      # A handler file that does not load, or an endpoint that cannot be used.
      warn "tasker-worker: #{e.class}: #{e.message}"
      1
    end

    def self.parse(argv)
      options = {}
      OptionParser.new do |o|
        o.banner = USAGE
        define_options(o, options)
      end.parse!(argv.dup)
      validate!(options)
      options
    end

    # The worker's command-line options, shared by exe/tasker-worker and
    # `tasker worker` (CLI::Worker), which adds --app: each sets its key in
    # options, the keywords of #initialize.
    def self.define_options(o, options)
      options[:handlers] ||= []
      o.on("--handlers PATH", "a .rb file or a directory of them defining step handlers (repeatable; " \
                              "required outside a Rails app)") { |v| options[:handlers] << v }
      o.on("--concurrency N", Integer, "threads running steps (default worker.max_workers)") { |v| options[:concurrency] = v }
      o.on("--prefetch N", Integer, "steps taken beyond the threads, queued for the next free one (default " \
                                    "worker.prefetch)") { |v| options[:prefetch] = v }
      o.on("--batch-endpoint E", "where the orchestrator publishes batches") { |v| options[:batch_endpoint] = v }
      o.on("--result-endpoint E", "where the orchestrator receives results") { |v| options[:result_endpoint] = v }
      o.on("--discovery NAME", "look the endpoints up under this name (discovery.name) and follow changes") { |v| options[:discovery] = v }
      o.on("--worker-id ID", "this worker's id (default host-pid-random)") { |v| options[:worker_id] = v }
      o.on("--shutdown-timeout SECONDS", Float, "how long TERM waits for running steps") { |v| options[:shutdown_timeout] = v }
      o.on("--queues A,B", "queues this worker serves, comma-separated (default worker.queues)") { |v| options[:queues] = v }
    end

    # Raises ArgumentError for options no worker can run with. rails_app:
    # nil where no Rails app can be booted (exe/tasker-worker), else whether
    # one was.
    def self.validate!(options, rails_app: nil)
      if options[:handlers].empty? && !rails_app
        raise ArgumentError, rails_app.nil? ? "--handlers is required" : "--handlers PATH is required outside a Rails app"
      end
      raise ArgumentError, "--concurrency must be at least 1" if options[:concurrency]&.< 1
      if (prefetch = options[:prefetch])
        bounds = Config::SCHEMA.fetch("worker.prefetch")
        raise ArgumentError, "--prefetch must be between #{bounds.min} and #{bounds.max}" unless prefetch.between?(bounds.min, bounds.max)
      end

      options[:queues] = Queues.list(options[:queues]) if options[:queues]

      options[:handlers].each do |path|
        raise ArgumentError, "--handlers #{path}: no such file or directory" unless File.exist?(path)
      end
      options
    end

    def initialize(handlers:, concurrency: nil, prefetch: nil, batch_endpoint: nil, result_endpoint: nil, worker_id: nil,
                   shutdown_timeout: nil, discovery: nil, queues: nil, logger: nil)
      @handler_paths = handlers
      # Discovery is used when no endpoint is given on the command line.
      @discovery = discovery || (batch_endpoint || result_endpoint ? nil : TaskerCore.config.dig("discovery", "name"))
      @shutdown_timeout = shutdown_timeout
      @logger = logger || (TaskerCore.respond_to?(:logger) && TaskerCore.logger) || Logger.new($stderr)
      # Only what was given on the command line; the rest defaults from config.
      @orchestrator_options = { max_workers: concurrency, prefetch: prefetch, step_sub_endpoint: batch_endpoint,
                                result_pub_endpoint: result_endpoint, worker_id: worker_id, queues: queues }.compact
    end

    # Runs until TERM or INT; returns the exit status.
    def run
      load_handlers
      signal_r, signal_w = IO.pipe
      previous = install_traps(signal_w)
      discovered = discover_endpoints(signal_r) if @discovery
      return 0 if @discovery && discovered.nil? # TERM/INT while waiting for an orchestrator

      worker = Orchestration::BatchStepExecutionOrchestrator.new(**@orchestrator_options, **(discovered || {}),
                                                                 logger: @logger)
      ActiveRecordDatabase.warn_small_pools(worker.max_workers, @logger)
      worker.start
      watcher = follow_discovery(worker) if @discovery
      wait_for_stop(signal_r, worker)
      stopped = @shutdown_timeout ? worker.stop(timeout: @shutdown_timeout) : worker.stop
      worker.error || !stopped ? 1 : 0
    ensure
      watcher&.stop
      previous&.each { |sig, handler| trap(sig, handler || "DEFAULT") }
      signal_r&.close
      signal_w&.close
    end

    private

    # Waits for an orchestrator registered under the discovery name; nil when
    # a stop signal came first.
    def discover_endpoints(signal_r)
      logged = false
      loop do
        entry = Discovery.lookup(@discovery)
        if entry
          @logger.info("tasker worker: orchestrator #{@discovery.inspect} is #{entry.owner} " \
                       "(#{entry.batch_endpoint}, #{entry.result_endpoint})")
          return { step_sub_endpoint: entry.batch_endpoint, result_pub_endpoint: entry.result_endpoint }
        end
        @logger.info("tasker worker: waiting for an orchestrator registered as #{@discovery.inspect}") unless logged
        logged = true
        return nil if IO.select([signal_r], nil, nil, 0.5) && %w[T I].include?(signal_r.read_nonblock(1, exception: false))
      end
    end

    def follow_discovery(worker)
      Discovery.watch(@discovery, logger: @logger) do |entry|
        worker.reconnect(batch_endpoint: entry.batch_endpoint, result_endpoint: entry.result_endpoint) if entry
      end
    end

    def load_handlers
      @handler_paths.each do |path|
        full = File.expand_path(path)
        files = File.directory?(full) ? Dir[File.join(full, "**", "*.rb")].sort : [full]
        raise ArgumentError, "--handlers #{path}: no such file or directory" unless File.exist?(full)

        files.each { |f| require f }
      end
    end

    # Trap handlers only write to a pipe: the real work (which takes locks)
    # happens on the main thread.
    def install_traps(signal_w)
      SIGNAL_BYTES.to_h do |sig, byte|
        [sig, trap(sig) { signal_w.write_nonblock(byte, exception: false) }]
      end
    end

    def wait_for_stop(signal_r, worker)
      loop do
        return if worker.error # the I/O thread died: nothing left to drain

        next unless IO.select([signal_r], nil, nil, 1.0)

        signal_r.read_nonblock(64, exception: false).to_s.each_char do |c|
          case c
          when "T", "I" then return
          when "S"
            @logger.info("tasker worker #{worker.worker_id}: TSTP, taking no new work (CONT resumes)")
            worker.pause
          when "C"
            @logger.info("tasker worker #{worker.worker_id}: CONT, taking work again")
            worker.resume
          end
        end
      end
    end
  end
end
