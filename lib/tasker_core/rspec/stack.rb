# frozen_string_literal: true

require "rbconfig"
require "socket"
require "tmpdir"
require "yaml"
require "fileutils"

module TaskerCore
  module RSpec
    # A running tasker_core for specs, started once per suite: PostgreSQL
    # (database.url / DATABASE_URL, under Rails the app's test database, else
    # an embedded cluster in a temp dir), the migrated schema, the native
    # orchestration loop in this process on free ports and one worker
    # subprocess: in a Rails app `tasker worker --app Rails.root` (the app
    # loaded, handlers autoloaded), else exe/tasker-worker loading
    # Stack.handler_paths. #reset! empties the tables between examples.
    #
    # It only empties a database it created (the embedded cluster) or whose
    # name ends in _test; any other raises UnsafeDatabaseError naming it,
    # unless TASKER_RSPEC_ALLOW_ANY_DATABASE=1. No files are left behind.
    #
    #   TaskerCore::RSpec::Stack.handler_paths = ["app/handlers"]
    #   TaskerCore::RSpec::Stack.worker_concurrency = 4
    class Stack
      TABLES = %w[tasker_workflow_step_transitions tasker_task_transitions tasker_workflow_step_edges
                  tasker_workflow_steps tasker_tasks tasker_task_templates tasker_workers].freeze
      WORKER_EXE = File.expand_path("../../../exe/tasker-worker", __dir__)
      TASKER_EXE = File.expand_path("../../../exe/tasker", __dir__)
      ALLOW_ENV = "TASKER_RSPEC_ALLOW_ANY_DATABASE"
      TEST_DATABASE = /_test\z/
      LIB = File.expand_path("../..", __dir__)

      class << self
        attr_writer :handler_paths, :worker_concurrency

        def handler_paths = @handler_paths || (File.directory?("app/handlers") ? ["app/handlers"] : [])
        def worker_concurrency = @worker_concurrency || 4

        # The stack with only the database (inline mode).
        def database!
          @current ||= new
          @current.start_database
          @current
        end

        def start!
          database!.start_processes
          @current
        end

        def current = @current || raise(Error, "no tasker stack: tag the example :tasker_stack or :tasker_inline")

        def shutdown!
          @current&.shutdown
          @current = nil
        end
      end

      attr_reader :url, :batch_endpoint, :result_endpoint, :worker_pid

      def start_database
        return if @url

        given = ENV["DATABASE_URL"].to_s
        given = TaskerCore.config.database["url"].to_s if given.empty?
        unless given.empty?
          self.class.check_database!(given)
          @url = given
        else
          @pg_dir = Dir.mktmpdir("tasker_rspec_pg")
          File.chmod(0o755, @pg_dir)
          @url = EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_rspec")
        end
        Store.migrate!(@url)
      end

      # Refuses (UnsafeDatabaseError) a database the kit did not create
      # whose name does not end in _test: #reset! empties every tasker table.
      def self.check_database!(url)
        conn = Store::Connection.new(url, connect_timeout: 5)
        name = conn.exec("SELECT current_database() AS d").first["d"]
        return name if TEST_DATABASE.match?(name) || ENV[ALLOW_ENV] == "1"

        raise UnsafeDatabaseError, "TaskerCore::RSpec refuses to use database #{name.inspect}: it empties every " \
                                   "tasker_* table before each example, and #{name.inspect} is not a test database " \
                                   "(its name does not end in _test) nor one the kit created. Point the specs at a " \
                                   "test database (DATABASE_URL, database.url in config/tasker-config.yml, or under " \
                                   "Rails the test entry of config/database.yml), unset them to let the kit start its " \
                                   "own PostgreSQL, or set #{ALLOW_ENV}=1 if emptying #{name.inspect} is really meant."
      ensure
        conn&.close
      end

      def start_processes
        return resume_orchestration if @worker_pid

        @batch_endpoint = "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}"
        @result_endpoint = "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}"
        @handle = OrchestrationHandle.new(batch_endpoint: @batch_endpoint, result_endpoint: @result_endpoint,
                                          heartbeat_timeout_ms: 3000, linger_ms: 0)
        @handle.start_orchestration(database_url: @url, lease_ms: 2000, poll_interval_ms: 20)
        start_worker
        deadline = monotonic + 30
        until @handle.workers.any?
          raise Error, "the tasker worker did not connect within 30s" if monotonic > deadline

          sleep 0.02
        end
      end

      # Inline examples share the database: the loop would claim their steps.
      def pause_orchestration
        @handle.stop_orchestration if @handle&.orchestrating?
        self
      end

      def resume_orchestration
        @handle.start_orchestration(database_url: @url, lease_ms: 2000, poll_interval_ms: 20) unless @handle.orchestrating?
        self
      end

      # Empties every tasker table (templates are re-recorded on create_task).
      def reset!
        Store.pool = Store::Pool.new(url: @url, size: 5, connect_timeout: 5) unless Store.instance_variable_get(:@pool)&.url == @url
        truncate_tables
        self
      end

      # The orchestration loop may be writing while the tables are emptied;
      # PostgreSQL then breaks the lock cycle by failing one side (40P01),
      # and emptying again is safe.
      def truncate_tables(attempts: 3)
        Store.with_connection { |c| c.exec("TRUNCATE #{TABLES.join(', ')} RESTART IDENTITY CASCADE") }
      rescue StoreError => e
        attempts -= 1
        raise unless e.sqlstate == "40P01" && attempts.positive?

        retry
      end

      def workers = @handle ? @handle.workers : []
      def stats = @handle&.stats

      def shutdown
        if @worker_pid
          Process.kill(:TERM, @worker_pid)
          Process.wait(@worker_pid)
        end
      rescue Errno::ESRCH, Errno::ECHILD
        nil
      ensure
        @worker_pid = nil
        FileUtils.rm_rf(@config_dir) if @config_dir
        @config_dir = nil
        if @handle && !@handle.closed?
          @handle.stop_orchestration
          @handle.close
        end
        Store.pool = nil if @url
        if @pg_dir
          EmbeddedPostgres.stop(dir: @pg_dir)
          FileUtils.rm_rf(@pg_dir)
        end
        @url = nil
      end

      private

      # The stack's worker serves the configured worker.queues and every
      # queue the known templates name (at most Queues::MAX_PER_WORKER).
      def worker_queues
        named = TaskerCore.task_templates.templates.flat_map { |t| [t.queue, *t.steps.map(&:queue)] }
        (TaskerCore.config.worker["queues"] + named.compact).uniq.first(Queues::MAX_PER_WORKER)
      rescue ConfigurationError
        TaskerCore.config.worker["queues"]
      end

      def start_worker
        endpoints = ["--concurrency", self.class.worker_concurrency.to_s, "--queues", worker_queues.join(","),
                     "--batch-endpoint", @batch_endpoint, "--result-endpoint", @result_endpoint]
        if (root = rails_root)
          # The app's own configuration, environment and database (its
          # ActiveRecord config unless DATABASE_URL is set), handlers autoloaded.
          env = { "RAILS_ENV" => ::Rails.env.to_s, "TASKER_ENV" => TaskerCore.config.environment }
          @worker_pid = Process.spawn(env, RbConfig.ruby, "-I", LIB, TASKER_EXE, "worker", "--app", root, *endpoints,
                                      pgroup: true)
          return
        end

        @config_dir = Dir.mktmpdir("tasker_rspec")
        config = File.join(@config_dir, "tasker-config.yml")
        File.write(config, { "default" => { "zeromq" => { "heartbeat_interval_ms" => 200 },
                                            "logging" => { "level" => "warn" } } }.to_yaml)
        @worker_pid = Process.spawn({ "TASKER_CONFIG_PATH" => config, "DATABASE_URL" => @url },
                                    RbConfig.ruby, "-I", LIB, WORKER_EXE, *handler_args, *endpoints, pgroup: true)
      end

      def rails_root
        return nil unless defined?(::Rails.application) && ::Rails.application && ::Rails.root

        ::Rails.root.to_s
      end

      def handler_args
        paths = self.class.handler_paths
        raise Error, "TaskerCore::RSpec::Stack.handler_paths is empty: name the files or folders of your handlers" if paths.empty?

        paths.flat_map { |p| ["--handlers", File.expand_path(p)] }
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
