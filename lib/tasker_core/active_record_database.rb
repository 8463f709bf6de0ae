# frozen_string_literal: true

module TaskerCore
  # tasker_core and an app's ActiveRecord (PostgreSQL) database, docs/rails.md:
  #
  # - the database: with no database.url / DATABASE_URL, TaskerCore.config's
  #   database.url is built from ActiveRecord's connection config for
  #   .record_class (ActiveRecord::Base; TaskerCore::Record when the app sets
  #   config.tasker_core.connects_to, like Solid Queue's connects_to);
  # - the transaction: TaskerCore.create_task runs its SQL on record_class's
  #   ActiveRecord connection (the pg gem's raw connection) when this thread
  #   has that connection in an open transaction, so the task commits or
  #   rolls back with it; .connection_mode = :always uses that connection even
  #   outside a transaction, :never never does.
  module ActiveRecordDatabase
    ADAPTERS = %w[postgresql postgis].freeze
    MODES = %i[in_transaction always never].freeze
    # ActiveRecord config key => libpq keyword; other libpq keywords pass as they are.
    RENAMED = { "database" => "dbname", "username" => "user" }.freeze
    LIBPQ_KEYS = %w[host hostaddr port dbname user password passfile connect_timeout client_encoding options
                    application_name keepalives keepalives_idle keepalives_interval keepalives_count
                    sslmode sslcert sslkey sslrootcert sslcrl sslpassword sslcompression requiressl
                    krbsrvname gsslib service target_session_attrs channel_binding gssencmode].freeze

    @record_class = nil
    @connection_mode = :in_transaction

    class << self
      # A class (or class name) whose connection tasker_core shares; nil =
      # ActiveRecord::Base.
      attr_writer :record_class

      def connection_mode = @connection_mode

      def connection_mode=(mode)
        mode = mode.to_sym
        raise ArgumentError, "connection_mode must be one of #{MODES.join(', ')}, got #{mode.inspect}" unless MODES.include?(mode)

        @connection_mode = mode
      end

      # Runs the block with another connection_mode (the rspec kit uses
      # :never: a task created inside a spec's transactional fixture must be
      # visible to the orchestrator and the inline runner).
      def with_connection_mode(mode)
        before = @connection_mode
        self.connection_mode = mode
        yield
      ensure
        @connection_mode = before
      end

      def active_record? = defined?(::ActiveRecord::Base) ? true : false

      def record_class
        return nil unless active_record?

        klass = @record_class || ::ActiveRecord::Base
        klass.is_a?(String) ? Object.const_get(klass) : klass
      end

      # A libpq conninfo string for record_class's database, or nil (no
      # ActiveRecord, no configuration, or not PostgreSQL).
      def url
        klass = record_class or return nil
        config = klass.connection_db_config or return nil
        hash = config.configuration_hash.transform_keys(&:to_s)
        return nil unless ADAPTERS.include?(hash["adapter"].to_s)
        return hash["url"] if hash["url"].is_a?(String) && hash["url"].match?(%r{\Apostgres(ql)?://})

        conninfo(hash)
      rescue StandardError => e
        TaskerCore.logger.debug { "tasker_core: no ActiveRecord database (#{e.class}: #{e.message})" }
        nil
      end

      # "key='value' ..." from an ActiveRecord configuration hash.
      def conninfo(hash)
        pairs = hash.filter_map do |key, value|
          key = RENAMED.fetch(key, key)
          next unless LIBPQ_KEYS.include?(key) && !value.nil? && value.to_s != ""

          "#{key}='#{value.to_s.gsub(/['\\]/) { |c| "\\#{c}" }}'"
        end
        pairs.join(" ")
      end

      # Warns for each ActiveRecord pool smaller than a worker's
      # concurrency: handlers using models would wait for connections.
      def warn_small_pools(concurrency, logger)
        return unless active_record?

        ::ActiveRecord::Base.connection_handler.connection_pool_list.each do |pool|
          next if pool.size >= concurrency

          logger.warn("tasker worker: ActiveRecord's pool for database #{pool.db_config.name.inspect} holds " \
                      "#{pool.size} connections, fewer than this worker's concurrency of #{concurrency}: handlers " \
                      "using models wait for a free connection (ActiveRecord::ConnectionTimeoutError after " \
                      "checkout_timeout). Set pool: #{concurrency} or more in config/database.yml.")
        end
      rescue StandardError => e
        logger.debug { "tasker worker: ActiveRecord pools not checked (#{e.class}: #{e.message})" }
      end

      # Yields a connection (exec(sql, params) -> rows) on record_class's
      # ActiveRecord connection when the mode and the thread's state call
      # for it and returns the block's value; otherwise returns NONE without
      # yielding.
      def with_shared_connection
        return NONE if @connection_mode == :never || !active_record?

        pool = record_class.connection_pool
        ar = pool.active_connection? # this thread's connection, if it has one
        if ar && ar.transaction_open?
          yield SharedConnection.new(ar)
        elsif @connection_mode == :always
          pool.with_connection { |c| yield SharedConnection.new(c) }
        else
          NONE
        end
      end
    end

    NONE = Object.new.freeze

    # The pg gem's raw connection behind an ActiveRecord adapter, with the
    # store's parameter encoding (Store::ParamEncoding): binary Strings go as
    # binary values, Arrays as PostgreSQL array literals. Rows come back as
    # the pg gem returns them (String values).
    class SharedConnection
      def initialize(adapter) = @adapter = adapter

      def exec(sql, params = [])
        encoded = params.map do |p|
          p.is_a?(String) && p.encoding == Encoding::BINARY ? { value: p, format: 1 } : Store::ParamEncoding.encode(p)
        end
        lock = @adapter.respond_to?(:lock) ? @adapter.lock : Monitor.new
        lock.synchronize do
          # ActiveRecord begins a transaction lazily (at its first query):
          # make sure BEGIN has been sent before using the raw connection.
          @adapter.materialize_transactions if @adapter.respond_to?(:materialize_transactions)
          @adapter.raw_connection.exec_params(sql, encoded).to_a
        end
      end
    end
  end
end
