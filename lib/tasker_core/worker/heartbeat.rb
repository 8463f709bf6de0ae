# frozen_string_literal: true

module TaskerCore
  module Worker
    # Builds this worker's heartbeat: its capacity, the queues it serves
    # (never shed: without them it would be sent steps of "default" only),
    # what the Ledger holds in flight and, while they fit the orchestrator's
    # result limit, the other optional fields.
    class Heartbeat
      # Optional heartbeat fields, left out in this order (the least needed
      # first) while the heartbeat is over the orchestrator's result limit,
      # which applies to every body on the result channel.
      SHEDDING = [%i[in_flight_steps last_batch_id], %i[connection], %i[limits]].freeze

      def initialize(settings:, ledger:, stats:)
        @worker_id = settings.worker_id
        @limits = settings.advertised_limits
        @queues = settings.queues
        @ledger = ledger
        @stats = stats
      end

      # The heartbeat's frames. connection: Connection#summary.
      def frames(capacity:, connection:)
        ledger = @ledger
        optional = { connection: connection, limits: @limits, last_batch_id: ledger.last_batch_id,
                     in_flight_steps: ledger.in_flight_steps }
        limit = Partials.result_limit(ledger.result_limits)
        frames = nil
        [[], *SHEDDING].each do |shed|
          shed.each { |key| optional.delete(key) }
          frames = Protocol.encode(Protocol.heartbeat(worker_id: @worker_id, capacity: capacity,
                                                      in_flight: ledger.in_flight, queues: @queues, **optional))
          return frames if limit.nil? || frames[1].bytesize <= limit

          @stats.warn_once(:heartbeat_over_limit) do
            "a heartbeat of #{frames[1].bytesize} bytes is over the orchestrator's result limit of #{limit} bytes; " \
              "sending heartbeats with fewer optional fields"
          end
        end
        frames # nothing smaller to send
      end
    end
  end
end
