# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker demo [--tasks N]
    class Demo < Command
      DESCRIPTION = <<~TEXT.chomp
        Runs the order-fulfilment workflow (examples/order_fulfilment) end to end:
        validate -> reserve_inventory and charge_payment in parallel -> ship -> notify,
        with a payment step that fails transiently for one order in ten and is retried.
        It starts one `tasker orchestrator` and --workers `tasker worker` processes, creates
        --tasks orders, shows progress and ends with a summary (tasks, steps, retries,
        failures, p50/p99 step latency, steps/s). Ctrl-C stops everything it started.
        Database: DATABASE_URL / database.url; when neither is set, an embedded PostgreSQL
        in tmp/postgres (left running for the next run; --stop-postgres stops it).
        Exit status: 0 when every task completed, 1 otherwise, 130 on Ctrl-C.
      TEXT

      private

      def define_options(o)
        o.on("--tasks N", "orders to run (default 1000)") { |v| @options[:tasks] = integer_arg(v, "--tasks") }
        o.on("--workers N", "worker processes (default 2)") { |v| @options[:workers] = integer_arg(v, "--workers") }
        o.on("--concurrency N", "threads per worker (default 10)") { |v| @options[:concurrency] = integer_arg(v, "--concurrency") }
        o.on("--stall-timeout SECONDS", Float, "give up when no task finishes for this long (default 60)") { |v| @options[:stall_timeout] = v }
        o.on("--stop-postgres", "stop the embedded PostgreSQL at the end") { @options[:stop_postgres] = true }
        o.on("--json", "print the summary as JSON on stdout (progress stays on stderr)") { @options[:json] = true }
      end

      def call(_args)
        require_relative "../demo"
        previous = trap("TERM") { raise Interrupt }
        url = config.database["url"]
        demo = TaskerCore::Demo.new(
          tasks: @options.fetch(:tasks, 1000), workers: @options.fetch(:workers, 2),
          concurrency: @options.fetch(:concurrency, 10), database_url: url, config_path: @options[:config],
          env: @options[:env], stall_timeout: @options.fetch(:stall_timeout, 60.0),
          stop_postgres: @options.fetch(:stop_postgres, false), out: @options[:json] ? err : out, err: err
        )
        status = demo.run
        print_json(demo.summary) if @options[:json]
        status
      ensure
        trap("TERM", previous || "DEFAULT") if previous
      end
    end
  end
end
