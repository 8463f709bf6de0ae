# frozen_string_literal: true

require_relative "store/connection"
require_relative "store/migrator"
require_relative "store/pool"

module TaskerCore
  # The PostgreSQL store: connections (TaskerCore::Store::Connection, in C),
  # the schema migrations and the process's connection pool. The schema and
  # the SQL functions are described in docs/store.md.
  module Store
    @pool = nil
    @pool_lock = Mutex.new

    class << self
      # database.url from the configuration (DATABASE_URL overrides it);
      # "" lets libpq use its PG* environment variables.
      def configured_url
        TaskerCore.config.database["url"] || ""
      end

      # Applies pending migrations; returns the versions applied.
      def migrate!(url = configured_url)
        conn = Connection.new(url, connect_timeout: TaskerCore.config.database["connect_timeout_s"])
        Migrator.new(conn).migrate!
      ensure
        conn&.close
      end

      def pool
        @pool || @pool_lock.synchronize do
          @pool ||= begin
            db = TaskerCore.config.database
            Pool.new(url: configured_url, size: db["pool"], connect_timeout: db["connect_timeout_s"],
                     statement_timeout_ms: db["statement_timeout_ms"])
          end
        end
      end

      # Use a pool for url (tests, tools); nil goes back to the configured one.
      def pool=(pool)
        @pool_lock.synchronize do
          @pool&.disconnect!
          @pool = pool
        end
      end

      def with_connection(&block)
        pool.with_connection(&block)
      end

      # with_connection + transaction
      def transaction(&block)
        with_connection { |c| c.transaction(&block) }
      end

      def disconnect!
        @pool_lock.synchronize do
          @pool&.disconnect!
          @pool = nil
        end
      end
    end
  end
end
