# frozen_string_literal: true

require "rbconfig"
require "socket"
require "tmpdir"
require "yaml"
require "fileutils"

module TaskerCore
  module RSpec
    # A running tasker_core for specs, started once per suite: PostgreSQL
    # (DATABASE_URL, else an embedded cluster in a temp dir), the migrated
    # schema, the native orchestration loop in this process on free ports and
    # one worker subprocess (exe/tasker-worker) loading Stack.handler_paths.
    # #reset! empties the tables between examples.
    #
    #   TaskerCore::RSpec::Stack.handler_paths = ["app/handlers"]
    #   TaskerCore::RSpec::Stack.worker_concurrency = 4
    class Stack
      TABLES = %w[tasker_workflow_step_transitions tasker_task_transitions tasker_workflow_step_edges
                  tasker_workflow_steps tasker_tasks tasker_task_templates tasker_workers].freeze
      WORKER_EXE = File.expand_path("../../../exe/tasker-worker", __dir__)
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

        given = ENV["DATABASE_URL"]
        if given && !given.empty?
          @url = given
        else
          @pg_dir = Dir.mktmpdir("tasker_rspec_pg")
          File.chmod(0o755, @pg_dir)
          @url = EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_rspec")
        end
        Store.migrate!(@url)
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

      def start_worker
        @config_dir = Dir.mktmpdir("tasker_rspec")
        config = File.join(@config_dir, "tasker-config.yml")
        File.write(config, { "default" => { "zeromq" => { "heartbeat_interval_ms" => 200 },
                                            "logging" => { "level" => "warn" } } }.to_yaml)
        args = handler_args
        @worker_pid = Process.spawn({ "TASKER_CONFIG_PATH" => config, "DATABASE_URL" => @url },
                                    RbConfig.ruby, "-I", LIB, WORKER_EXE, *args,
                                    "--concurrency", self.class.worker_concurrency.to_s,
                                    "--batch-endpoint", @batch_endpoint, "--result-endpoint", @result_endpoint,
                                    pgroup: true)
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
