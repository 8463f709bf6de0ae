# frozen_string_literal: true

module TaskerCore
  # ZeroMQ sockets: Publisher (XPUB) and Subscriber (SUB). The classes and
  # their C methods come from the extension (ext/tasker_core/socket_class.c),
  # which loads this file; here are the keyword-argument constructors and
  # wrappers.
  #
  # A socket belongs to the thread that made it (ThreadOwnershipError
  # elsewhere, until that thread ends) and to the process that made it
  # (ForkSafetyError in a forked child: make a new one there).
  module Socket
    # Common to both kinds: bind/connect, options, stats, events, close.
    class Base
      def inspect
        state = closed? ? "closed" : (last_endpoint || "unbound")
        "#<#{self.class.name} #{state}>"
      rescue ConnectionError
        "#<#{self.class.name}>"
      end

      private

      # Opens the socket, applies the block, and binds/connects; closes it
      # again if anything raises so a failed constructor leaks nothing.
      def open_with(bind, connect)
        _open
        ok = false
        yield
        Array(bind).each { |endpoint| self.bind(endpoint) }
        Array(connect).each { |endpoint| self.connect(endpoint) }
        ok = true
      ensure
        close unless ok
      end
    end

    # XPUB with XPUB_NODROP and XPUB_VERBOSER: a send refused at the
    # high-water mark returns false and is counted in stats[:send_dropped],
    # and every subscription arrives in #subscriptions.
    class Publisher < Base
      def initialize(bind: nil, connect: nil, send_hwm: 1000, linger: 0)
        super()
        open_with(bind, connect) do
          self.send_hwm = send_hwm
          self.linger = linger
        end
      end

      # Drains subscription changes seen so far: [[:subscribe, "topic"], ...].
      # Waits up to timeout_ms for the first one (nil: forever).
      def subscriptions(timeout_ms: 0)
        _subscriptions(timeout_ms)
      end
    end

    # SUB socket. Messages come back as arrays of binary strings (frames).
    class Subscriber < Base
      def initialize(bind: nil, connect: nil, topics: [""], recv_hwm: 1000, linger: 0)
        super()
        open_with(bind, connect) do
          self.recv_hwm = recv_hwm
          self.linger = linger
          Array(topics).each { |topic| subscribe(topic) }
        end
      end

      # One message ([frame, ...]) or nil after timeout_ms (nil: wait forever).
      def receive(timeout_ms: nil)
        _receive(timeout_ms)
      end

      # Waits up to timeout_ms for the first message, then takes up to max
      # messages that are already there, without waiting again.
      def receive_many(max: 256, timeout_ms: nil)
        _receive_many(max, timeout_ms)
      end
    end
  end
end
