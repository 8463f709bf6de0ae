# frozen_string_literal: true

module TaskerCore
  module Worker
    # The worker's two sockets and everything about them, owned by the I/O
    # thread (a libzmq socket belongs to the thread that made it): the batch
    # subscriber, the result publisher, the wake-up pipe the other threads
    # write to, the outbox, heartbeat timing, the orchestrator's
    # subscription, reopening a dead socket, moving to new endpoints
    # (discovery). Links follows the connections' health.
    #
    # Only #wake, #move_to, #endpoints, #history and #summary are called
    # from other threads.
    class Connection
      # Back-off before retrying a send the publisher refused at its HWM.
      SEND_RETRY_S = 0.005

      # The Outgoing messages not yet sent, oldest first.
      attr_reader :outbox

      def initialize(settings:, stats:, logger:)
        @settings = settings
        @worker_id = settings.worker_id
        @stats = stats
        @logger = logger
        @mutex = Mutex.new # guards @endpoints, @endpoint_change
        @endpoints = [settings.batch_endpoint, settings.result_endpoint]
        @endpoint_change = nil
        @links = Links.new(settings: settings, stats: stats, logger: logger)
        @outbox = []
        @peer_subscriptions = 0
        @next_heartbeat_at = nil
        @retry_at = nil
        @wake_pending = false
      end

      # ---- any thread ---------------------------------------------------

      def endpoints
        batch, result = @mutex.synchronize { @endpoints }
        { batch_endpoint: batch, result_endpoint: result }
      end

      # Asks the I/O thread to move both sockets (a new orchestrator took over).
      def move_to(batch_endpoint, result_endpoint)
        @mutex.synchronize { @endpoint_change = [batch_endpoint, result_endpoint] }
        wake
      end

      # Links#history and Links#summary.
      def history = @links.history

      def summary = @links.summary

      # Wakes the I/O thread. One byte per wait: while a wake-up is pending,
      # later callers write nothing (what they queued before calling is
      # seen by the loop that follows the pending wake-up).
      def wake
        return if @wake_pending

        @wake_pending = true
        @wake_w&.write_nonblock(".", exception: false)
      rescue IOError
        nil # pipe closed: the I/O thread has finished and needs no wake-up
      end

      # ---- the I/O thread -------------------------------------------------

      # Opens the wake-up pipe and both sockets.
      def open
        @wake_r, @wake_w = IO.pipe
        @wake_pending = false # a wake before the pipe existed wrote nothing
        @sub = open_socket(:batch)
        @pub = open_socket(:result)
        self
      end

      def close
        @sub&.close
        @pub&.close
        @wake_r&.close
        @wake_w&.close
      rescue StandardError => e
        @logger.warn("tasker worker #{@worker_id}: closing sockets: #{e.message}")
      end

      # Waits up to wait_ms for a batch, a subscription change or a wake-up.
      # Returns true when the batch socket is readable.
      def wait(wait_ms)
        readable = TaskerCore::Socket.select([@sub, @pub, @wake_r], wait_ms)
        if readable.include?(@wake_r)
          drain_wake_pipe
          # Cleared after the byte is read and before the caller looks at
          # what the waking threads queued: a wake-up after this writes again.
          @wake_pending = false
        end
        readable.include?(@sub)
      end

      # Up to 256 messages already on the batch socket.
      def receive_batches
        @sub.receive_many(max: 256, timeout_ms: 0)
      end

      def peer_subscribed? = @peer_subscriptions.positive?

      # The earliest time this connection has something to do, or nil.
      def next_due_at
        [@next_heartbeat_at, (@retry_at unless @outbox.empty?), @links.next_due_at].compact.min
      end

      # Moves to new endpoints if asked; yields the batches the old batch
      # socket still held. True when it moved.
      def apply_endpoint_change(&on_batch)
        change = @mutex.synchronize { @endpoint_change.tap { @endpoint_change = nil } }
        return false if change.nil? || change == @endpoints

        record_socket_events
        @logger.info("tasker worker #{@worker_id}: moving to batches from #{change[0]}, results to #{change[1]}")
        @mutex.synchronize { @endpoints = change }
        reopen(:batch, &on_batch)
        reopen(:result)
        @links.moved
        true
      end

      # A socket whose connection dropped and did not come back within its
      # grace period is opened again; yields what the batch socket held.
      def reopen_dead_sockets(&on_batch)
        @links.dead(monotonic).each do |kind, grace|
          endpoint = kind == :batch ? @endpoints[0] : @endpoints[1]
          @logger.warn("tasker worker #{@worker_id}: the #{kind} socket lost its connection to #{endpoint} and did not " \
                       "reconnect within #{grace.round(2)} s; opening it again")
          @stats.bump(:sockets_reopened)
          reopen(kind, dead: true, &on_batch)
        end
      end

      # Follows the orchestrator's subscription to results: a heartbeat at
      # once when it (re)subscribes, none while it is away.
      def track_subscriptions
        @pub.subscriptions(timeout_ms: 0).each do |kind, _topic|
          before = peer_subscribed?
          @peer_subscriptions += kind == :subscribe ? 1 : -1
          @peer_subscriptions = 0 if @peer_subscriptions.negative?
          if !before && peer_subscribed?
            @logger.info("tasker worker #{@worker_id}: orchestrator subscribed to results")
            @next_heartbeat_at = monotonic
          elsif before && !peer_subscribed?
            @logger.warn("tasker worker #{@worker_id}: orchestrator unsubscribed; holding results until it returns")
            @next_heartbeat_at = nil
          end
        end
      end

      # The next heartbeat goes out now (capacity changed).
      def heartbeat_now! = (@next_heartbeat_at = monotonic)

      def heartbeat_due? = !@next_heartbeat_at.nil? && monotonic >= @next_heartbeat_at

      # A refused heartbeat is not retried: the next one supersedes it.
      def send_heartbeat(frames)
        @stats.bump(:heartbeats_sent) if @pub.send_parts(frames)
        @next_heartbeat_at = monotonic + @settings.heartbeat_interval_s
      end

      # Sends the outbox in order, as much of it as the publisher takes in
      # this call (every message queued since the last wake). Step results
      # next to each other leave as one message (one partial_result, or a
      # partial_results for several: docs/protocol.md 4.3), so results that
      # finished while the last send was going out travel together. A
      # message the publisher refuses at its high-water mark stays at the
      # head and is retried: results are never dropped, and a completion
      # never overtakes its batch's partials. Returns the Outgoing messages
      # sent.
      def flush
        return [] unless peer_subscribed?

        @retry_at = nil
        sent = 0
        while sent < @outbox.size
          head = @outbox[sent]
          run = head.entry ? result_run(sent) : 1
          frames = head.entry ? Protocol.result_frames(@worker_id, @outbox[sent, run].map(&:entry)) : head.frames
          unless @pub.send_parts(frames)
            @stats.bump(:send_retries)
            @retry_at = monotonic + SEND_RETRY_S
            break
          end
          sent += run
          count_sent(head, run)
        end
        @outbox.shift(sent)
      end

      # Most results in one partial_results.
      MAX_RESULTS_PER_MESSAGE = 1000

      SENT_COUNTER = { completion: :completions_sent, refusal: :refusals_sent }.freeze

      # Flushes until the outbox is empty or deadline (monotonic) passes;
      # yields what each flush sent.
      def flush_until(deadline)
        until @outbox.empty? || monotonic >= deadline
          track_subscriptions
          yield flush
          TaskerCore::Socket.select([@pub], (SEND_RETRY_S * 1000).ceil) unless @outbox.empty?
        end
      end

      # How many step results from outbox index i on fit one message: each
      # result's batch limit holds for the whole body.
      def result_run(i)
        head = @outbox[i]
        size = Partials::ENVELOPE_BYTES + head.entry.bytesize
        limit = head.limit
        n = 1
        while n < MAX_RESULTS_PER_MESSAGE && (out = @outbox[i + n]) && out.entry
          size += out.entry.bytesize
          limit = [limit, out.limit].compact.min
          break if limit && size > limit

          n += 1
        end
        n
      end

      def count_sent(head, run)
        return @stats.bump(SENT_COUNTER.fetch(head.kind)) unless head.entry

        @stats.bump(:partials_sent, run)
        @stats.bump(:partial_results_sent) if run > 1
      end

      # Unsubscribes, counts what was never sent and says goodbye.
      def finish
        @sub.unsubscribe(Protocol.batch_topic(@worker_id))
        unless @outbox.empty?
          @stats.bump(:results_unsent, @outbox.size)
          @logger.error("tasker worker #{@worker_id}: #{@outbox.size} message(s) could not be sent before shutdown " \
                        "(orchestrator #{peer_subscribed? ? 'not keeping up' : 'not connected'}); " \
                        "the orchestrator re-dispatches those steps")
        end
        @pub.send_parts(Protocol.encode(Protocol.goodbye(worker_id: @worker_id, reason: "shutdown"))) if peer_subscribed?
      end

      # Hands the sockets' monitor events to Links.
      def record_socket_events
        batch = @sub.events
        result = @pub.events
        return if batch.empty? && result.empty?

        @links.record(batch.map { |e| e.merge(socket: :batch) } + result.map { |e| e.merge(socket: :result) })
      end

      private

      # The one place a socket of this worker is made, from its settings, so
      # a reopened or moved socket keeps its CURVE keys, high-water marks,
      # message size limit, linger and monitor.
      def open_socket(kind)
        s = @settings
        common = { linger: s.linger_ms, curve_client: s.curve, max_message_bytes: s.max_message_bytes,
                   monitor: true }.compact
        if kind == :batch
          TaskerCore::Socket::Subscriber.new(connect: @endpoints[0], topics: [Protocol.batch_topic(@worker_id)],
                                             recv_hwm: s.recv_hwm, **common)
        else
          # IMMEDIATE: no pipe to a connection that is not (or no longer)
          # complete, so the orchestrator going away shows as an
          # unsubscription and results wait here, not in a dead pipe
          # (docs/protocol.md 5).
          TaskerCore::Socket::Publisher.new(connect: @endpoints[1], send_hwm: s.send_hwm, immediate: true, **common)
        end
      end

      # Closes a socket and opens it again on the current endpoint (with its
      # subscription, for the batch socket). Batches already received are
      # yielded first; results the publisher had not yet sent are lost with
      # it and reconciled by the orchestrator from the next heartbeat.
      def reopen(kind, dead: false)
        if kind == :batch
          receive_batches.each { |frames| yield frames }
          @sub.close
          @sub = open_socket(:batch)
        else
          @pub.close
          @pub = open_socket(:result)
          @peer_subscriptions = 0
          @next_heartbeat_at = nil
        end
        @links.reopened(kind, dead: dead)
      end

      def drain_wake_pipe
        loop do
          chunk = @wake_r.read_nonblock(4096, exception: false)
          break if chunk == :wait_readable || chunk.nil? || chunk.bytesize < 4096
        end
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
