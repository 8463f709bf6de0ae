# frozen_string_literal: true

module TaskerCore
  module Worker
    # The health of the worker's two connections, read from the sockets'
    # monitor events (Connection#record_socket_events): when each went down,
    # how often it was reopened, failed handshakes, and the history and
    # totals a heartbeat reports. #history and #summary are read from other
    # threads; the rest runs on the I/O thread.
    class Links
      # libzmq reconnects a dropped TCP connection after ZMQ_RECONNECT_IVL
      # (100 ms) plus up to as much jitter, but not one it dropped itself
      # (libzmq 4.3.4: a message over ZMQ_MAXMSGSIZE, a refused handshake).
      # A socket down for longer than its grace (settings.reopen_grace_s,
      # doubled per reopen that sees no successful handshake, up to
      # REOPEN_GRACE_MAX_S) is opened again.
      REOPEN_GRACE_MAX_S = 10.0
      # One warning per kind of handshake failure per this many seconds.
      HANDSHAKE_LOG_INTERVAL_S = 60.0
      HISTORY = 50
      # Reconnect attempts while an orchestrator is away: not kept in the history.
      NOISY_EVENTS = %i[connect_delayed connect_retried].freeze

      def initialize(settings:, stats:, logger:)
        @grace_s = settings.reopen_grace_s
        @worker_id = settings.worker_id
        @stats = stats
        @logger = logger
        @mutex = Mutex.new # guards @history, @counts
        @history = [] # newest last
        # Lifetime totals over both sockets, sent in each heartbeat's "connection".
        @counts = { "connects" => 0, "disconnects" => 0, "last_event" => nil, "last_event_at" => nil }
        @handshake_logged = {} # event => [monotonic time of the last warning, failures since]
        @links = { batch: { down_since: nil, reopens: 0 }, result: { down_since: nil, reopens: 0 } }
      end

      # [{socket: :batch|:result, event:, endpoint:, at:}], oldest first.
      def history = @mutex.synchronize { @history.dup }

      # {"connects", "disconnects", "last_event", "last_event_at"}: the
      # connected/disconnected events of both sockets since start and the
      # latest of them (the heartbeat's optional "connection" field).
      def summary = @mutex.synchronize { @counts.dup }

      # Monitor events of both sockets ({socket:, event:, endpoint:, at:}).
      def record(events)
        events = events.reject { |e| NOISY_EVENTS.include?(e[:event]) }
        return if events.empty?

        events.sort_by! { |e| e[:at] }
        events.each { |e| track(e) }
        @mutex.synchronize do
          events.each { |e| count(e) }
          @history.concat(events)
          @history.shift(@history.size - HISTORY) if @history.size > HISTORY
        end
      end

      # {kind => grace in seconds} of the sockets down past their grace.
      def dead(now)
        return NONE_DEAD unless down?

        @links.filter_map { |kind, l| [kind, grace(l)] if l[:down_since] && now >= l[:down_since] + grace(l) }.to_h
      end

      # When the next socket would be dead, or nil.
      def next_due_at
        return nil unless down?

        @links.each_value.filter_map { |l| l[:down_since] + grace(l) if l[:down_since] }.min
      end

      # kind was opened again; reopened: because it was dead.
      def reopened(kind, dead: false)
        @links[kind][:down_since] = nil
        @links[kind][:reopens] += 1 if dead
      end

      # New endpoints: no reopen so far there.
      def moved = @links.each_value { |l| l[:reopens] = 0 }

      private

      NONE_DEAD = {}.freeze

      def down? = @links[:batch][:down_since] || @links[:result][:down_since]

      def grace(link) = [@grace_s * (2**[link[:reopens], 16].min), [REOPEN_GRACE_MAX_S, @grace_s].max].min

      def track(event)
        link = @links[event[:socket]]
        case event[:event]
        when :disconnected then link[:down_since] ||= Process.clock_gettime(Process::CLOCK_MONOTONIC)
        when :connected then link[:down_since] = nil
        when :handshake_succeeded then link[:reopens] = 0
        else
          handshake_failed(event) if event[:event].to_s.start_with?("handshake_failed")
        end
      end

      # Warns once per kind of failure per HANDSHAKE_LOG_INTERVAL_S (with the
      # number of failures since the last warning); counts every one.
      def handshake_failed(event)
        kind = event[:event]
        @stats.tally(:handshake_failures, kind)
        last_at, since = @handshake_logged[kind]
        now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        if last_at && now - last_at < HANDSHAKE_LOG_INTERVAL_S
          @handshake_logged[kind] = [last_at, since + 1]
          return
        end

        @handshake_logged[kind] = [now, 0]
        more = since.to_i.positive? ? " (#{since} more since the last warning)" : ""
        hint = kind == :handshake_failed_auth ? "; is this worker's CURVE public key on the orchestrator's allow-list?" : ""
        @logger.warn("tasker worker #{@worker_id}: #{event[:socket]} socket handshake with #{event[:endpoint]} failed " \
                     "(#{kind})#{more}#{hint}")
      end

      # Only connected/disconnected change the connection state; handshake
      # and close events are kept in the history but not counted here.
      def count(event)
        key = { connected: "connects", disconnected: "disconnects" }[event[:event]]
        return unless key

        @counts[key] += 1
        @counts["last_event"] = event[:event].to_s
        @counts["last_event_at"] = event[:at].to_f
      end
    end
  end
end
