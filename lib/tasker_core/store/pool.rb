# frozen_string_literal: true

module TaskerCore
  module Store
    # A small per-process pool of Connections: a thread takes one for the
    # length of a block and gives it back. After fork the child drops the
    # parent's connections (without closing them: they are the parent's
    # sessions) and opens its own.
    #
    # A connection is checked before it is handed out (Connection#alive?
    # reads what the server sent while it sat idle): one lost to a server
    # restart or a dropped network is replaced, not given to the caller.
    # with_connection(idempotent: true), for blocks that are safe to run twice,
    # runs the block once more on a new connection when the first one is
    # lost under it. #reconnects counts the connections replaced.
    class Pool
      # SQLSTATEs of a lost connection: class 08 (connection exception), and
      # the server shutting down or not yet accepting connections.
      LOST_SQLSTATES = /\A(08|57P0[123])/

      attr_reader :url, :size

      def initialize(url:, size:, connect_timeout: nil, statement_timeout_ms: 0, checkout_timeout: 10)
        @url = url
        @size = size
        @connect_timeout = connect_timeout
        @options = statement_timeout_ms.to_i.positive? ? "-c statement_timeout=#{statement_timeout_ms.to_i}" : nil
        @checkout_timeout = checkout_timeout
        @lock = Mutex.new
        @available = ConditionVariable.new
        @reconnects = 0
        reset_for_pid
      end

      # idempotent: the block is safe to run twice (it reads, or its writes
      # are idempotent): when its connection is lost under it, it runs once
      # more on a new connection. Not inside an enclosing with_connection of
      # the same thread (that block owns the connection).
      def with_connection(idempotent: false, &block)
        owned = Thread.current.thread_variable_get(key)
        return yield(owned) if owned # re-entrant in the same thread

        checked_out(&block)
      rescue StoreError => e
        raise unless idempotent && !owned && LOST_SQLSTATES.match?(e.sqlstate.to_s)

        @lock.synchronize { @reconnects += 1 }
        checked_out(&block)
      end

      # Connections replaced because they were lost (at checkout or under a
      # retried block).
      def reconnects = @lock.synchronize { @reconnects }

      # Closes the idle connections (connections in use close when given back).
      def disconnect!
        @lock.synchronize do
          reset_for_pid if @pid != Process.pid
          @idle.each(&:close)
          @total -= @idle.size
          @idle.clear
        end
      end

      private

      def checked_out
        conn = checkout
        Thread.current.thread_variable_set(key, conn)
        begin
          yield conn
        ensure
          Thread.current.thread_variable_set(key, nil)
          checkin(conn)
        end
      end

      def key = :"tasker_core_store_pool_#{object_id}"

      def reset_for_pid
        @pid = Process.pid
        @idle = []
        @total = 0
      end

      def checkout
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + @checkout_timeout
        @lock.synchronize do
          loop do
            reset_for_pid if @pid != Process.pid
            while (conn = @idle.pop)
              return conn if conn.alive?

              conn.close # lost (server restart, network): drop it, open another
              @total -= 1
              @reconnects += 1
            end
            if @total < @size
              @total += 1
              break
            end
            left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
            raise StoreError, "no database connection free in #{@checkout_timeout}s (database.pool = #{@size})" if left <= 0

            @available.wait(@lock, left)
          end
        end
        open_connection
      end

      def open_connection
        Connection.new(@url, connect_timeout: @connect_timeout, options: @options)
      rescue Exception # rubocop:disable Lint/RescueException
        @lock.synchronize { @total -= 1 if @pid == Process.pid }
        raise
      end

      def checkin(conn)
        @lock.synchronize do
          return if @pid != Process.pid # opened before fork in the parent: not ours

          if conn.usable? && !conn.in_transaction?
            @idle.push(conn)
          else
            conn.close unless conn.closed?
            @total -= 1
          end
          @available.signal
        end
      end
    end
  end
end
