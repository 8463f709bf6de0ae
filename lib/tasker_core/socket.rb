# frozen_string_literal: true

require "socket"

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
    # A TCP port on 127.0.0.1 that nobody listens on right now, for endpoints
    # chosen at run time (the demo, the rspec kit, the embedded PostgreSQL).
    def self.free_tcp_port
      server = ::TCPServer.new("127.0.0.1", 0)
      server.addr[1]
    ensure
      server&.close
    end

    # Common to both kinds: bind/connect, options, stats, events, close.
    class Base
      # The ZAP domain of a CURVE server socket, else nil.
      attr_reader :zap_domain

      # Swaps a CURVE server's allow-list.
      def allowed_client_keys=(keys)
        raise ConfigurationError, "not a CURVE server socket" unless @zap_domain

        TaskerCore::Curve.allow(@zap_domain, keys)
      end

      # {allowed:, denied:} handshakes of a CURVE server socket.
      def handshakes
        @zap_domain ? TaskerCore::Curve.zap_counts(@zap_domain) : { allowed: 0, denied: 0 }
      end

      def inspect
        state = closed? ? "closed" : (last_endpoint || "unbound")
        "#<#{self.class.name} #{state}>"
      rescue ConnectionError
        "#<#{self.class.name}>"
      end

      private

      # Opens the socket, applies the block, and binds/connects; closes it
      # again if anything raises so a failed constructor leaks nothing.
      #
      # curve_server: { secret_key:, allowed_client_keys: [...] } makes it a
      # CURVE server whose allow-list (a ZAP domain of its own) decides who
      # may connect; curve_client: { server_key:, public_key:, secret_key: }
      # makes it a CURVE client. Keys are Z85 strings (TaskerCore::Curve).
      #
      # monitor: true attaches a connection-event monitor whose events
      # (connected, disconnected, closed, handshake_succeeded,
      # handshake_failed_auth / _protocol / _no_detail) #events hands out;
      # without it #events is always empty. Only for a socket whose owner
      # calls #events regularly: at most TC_SOCKET_EVENT_RING (64) are kept
      # between two calls, the oldest dropped (stats[:events_dropped]).
      def open_with(bind, connect, curve_server: nil, curve_client: nil, max_message_bytes: nil, monitor: false)
        _open
        ok = false
        _monitor if monitor
        self.max_message_bytes = max_message_bytes if max_message_bytes
        if curve_server
          @zap_domain = TaskerCore::Curve.new_domain
          TaskerCore::Curve.allow(@zap_domain, curve_server.fetch(:allowed_client_keys, []))
          _curve_server(curve_server.fetch(:secret_key), @zap_domain)
        end
        _curve_client(curve_client.fetch(:server_key), curve_client.fetch(:public_key), curve_client.fetch(:secret_key)) if curve_client
        yield
        Array(bind).each { |endpoint| self.bind(endpoint) }
        Array(connect).each { |endpoint| self.connect(endpoint) }
        ok = true
      ensure
        unless ok
          TaskerCore::Curve.forget(@zap_domain) if @zap_domain
          close
        end
      end
    end

    # XPUB with XPUB_NODROP and XPUB_VERBOSER: a send refused at the
    # high-water mark returns false and is counted in stats[:send_dropped],
    # and every subscription arrives in #subscriptions. immediate: true sets
    # ZMQ_IMMEDIATE before connecting: messages go only to completed
    # connections, and a connection that drops takes its pipe (and the
    # subscriptions that came over it: #subscriptions reports them gone)
    # with it instead of queueing for a reconnect.
    class Publisher < Base
      def initialize(bind: nil, connect: nil, send_hwm: 1000, linger: 0, immediate: false, **security)
        super()
        open_with(bind, connect, **security) do
          self.send_hwm = send_hwm
          self.linger = linger
          self.immediate = true if immediate
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
      def initialize(bind: nil, connect: nil, topics: [""], recv_hwm: 1000, linger: 0, **security)
        super()
        open_with(bind, connect, **security) do
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
