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

      # migrate! when the database has tasker_core's schema already (a gem
      # upgrade's new SQL); nil when it has none (the install migration
      # has not run) or the database cannot be reached (logged).
      def migrate_if_installed!(url = configured_url)
        begin
          conn = Connection.new(url, connect_timeout: TaskerCore.config.database["connect_timeout_s"])
          migrator = Migrator.new(conn)
          installed = migrator.current_version.positive?
        rescue StoreError => e
          TaskerCore.logger.warn("tasker_core: schema not checked (#{e.message})")
          return nil
        end
        installed ? migrator.migrate! : nil
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

      # idempotent: true when the block may run twice (see Pool#with_connection).
      def with_connection(idempotent: false, &block)
        pool.with_connection(idempotent: idempotent, &block)
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
