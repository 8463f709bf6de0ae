# frozen_string_literal: true

require_relative "store"
require_relative "internal/background_thread"

module TaskerCore
  # Deletes finished tasks (complete, error, cancelled) older than a cutoff,
  # with their steps, edges and histories (tasker_delete_finished_tasks,
  # db/migrate/0006_retention.sql): a small batch per call, each call its own
  # short transaction, rows other transactions hold skipped rather than
  # waited for. One cleaner at a time per database: a run holds a
  # session-level advisory lock, and a second cleaner (another orchestrator
  # process on the same database, `tasker cleanup`) finds it taken and does
  # nothing.
  #
  #   TaskerCore::Retention.new(older_than: 7 * 86_400).run(conn) # -> Result, or nil when another cleaner runs
  class Retention
    # pg_try_advisory_lock key: "tretain" in ASCII (the migrator's is "tasker")
    LOCK_KEY = 0x74726574_61696e
    BATCH_SIZE = 100
    DELETE_SQL = "SELECT tasks, steps FROM tasker_delete_finished_tasks(now() - make_interval(secs => $1), $2)"

    Result = Struct.new(:tasks, :steps, :batches, keyword_init: true)

    # older_than: seconds; batch_size: tasks per transaction.
    def initialize(older_than:, batch_size: BATCH_SIZE)
      raise ArgumentError, "older_than must be a positive number of seconds" unless older_than.is_a?(Numeric) && older_than.positive?
      raise ArgumentError, "batch_size must be a positive Integer" unless batch_size.is_a?(Integer) && batch_size.positive?

      @older_than = older_than
      @batch_size = batch_size
    end

    attr_reader :older_than, :batch_size

    # Deletes batch after batch until one comes back short; yields the
    # running Result after each batch. conn must not be in a transaction
    # (each batch commits on its own).
    def run(conn)
      raise ArgumentError, "run the cleanup outside a transaction: each batch commits on its own" if conn.in_transaction?
      return nil unless conn.exec("SELECT pg_try_advisory_lock($1) AS ok", [LOCK_KEY]).first["ok"]

      begin
        result = Result.new(tasks: 0, steps: 0, batches: 0)
        loop do
          row = conn.exec(DELETE_SQL, [@older_than.to_f, @batch_size]).first
          result.tasks += row["tasks"]
          result.steps += row["steps"]
          result.batches += 1
          yield result if block_given?
          break if row["tasks"] < @batch_size
        end
        result
      ensure
        conn.exec("SELECT pg_advisory_unlock($1)", [LOCK_KEY]) if conn.usable?
      end
    end

    # The periodic cleanup of an orchestrator process: a thread that runs a
    # Retention every interval seconds on a connection of its own, logs what
    # it deleted (and nothing when there was nothing), and survives database
    # errors (logged; tried again next time).
    class Sweeper
      include Internal::BackgroundThread

      def self.from_config(config = TaskerCore.config, url: nil)
        after = config.retention["finished_after"]
        return nil if after.nil?

        new(older_than: Config.duration_seconds(after), interval: config.retention["interval_s"],
            url: url || config.database["url"] || "", connect_timeout: config.database["connect_timeout_s"])
      end

      def initialize(older_than:, interval:, url:, connect_timeout: 5, batch_size: BATCH_SIZE, logger: TaskerCore.logger)
        @retention = Retention.new(older_than: older_than, batch_size: batch_size)
        @interval = interval
        @url = url
        @connect_timeout = connect_timeout
        @logger = logger
        init_background_thread
      end

      private

      def thread_name = "tasker_core retention"

      def run
        conn = nil
        loop do
          conn = sweep(conn)
          break if pause(@interval)
        end
      ensure
        conn&.close
      end

      # -> the connection to use next time (nil after an error)
      def sweep(conn)
        conn ||= Store::Connection.new(@url, connect_timeout: @connect_timeout)
        result = :stopped
        # #stop does not wait for the rest of a long cleanup: it ends after the batch in hand.
        catch(:stop) { result = @retention.run(conn) { throw :stop if @stopping } }
        if result == :stopped
          nil
        elsif result.nil?
          @logger.debug("tasker retention: another process is cleaning up; skipped")
        elsif result.tasks.positive?
          @logger.info("tasker retention: deleted #{result.tasks} finished task(s) and #{result.steps} step(s) " \
                       "older than #{@retention.older_than.round}s in #{result.batches} batch(es)")
        end
        conn
      rescue StandardError => e
        @logger.warn("tasker retention: cleanup failed (#{e.class}: #{e.message}); trying again in #{@interval}s")
        conn&.close
        nil
      end
    end
  end
end
