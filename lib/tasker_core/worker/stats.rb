# frozen_string_literal: true

require "set"

module TaskerCore
  module Worker
    # The worker's counters (BatchStepExecutionOrchestrator#stats), written by
    # the I/O thread and the pool threads, and the "log once per reason" rule
    # that keeps a misbehaving peer from flooding the log.
    class Stats
      COUNTERS = %i[batches_received steps_received steps_completed steps_failed steps_timed_out
                    late_results_discarded threads_abandoned partials_sent completions_sent heartbeats_sent
                    send_retries results_unsent refusals_sent steps_refused_unnamed outputs_too_large
                    outputs_too_deep sockets_reopened partial_results_sent].freeze
      # Counters kept per reason.
      TALLIES = %i[bad_messages steps_refused handshake_failures].freeze

      def initialize(logger:, worker_id:)
        @logger = logger
        @worker_id = worker_id
        @mutex = Mutex.new
        @counts = COUNTERS.to_h { |k| [k, 0] }
        TALLIES.each { |k| @counts[k] = Hash.new(0) }
        @logged = Set.new
        @logged_mutex = Mutex.new
      end

      def bump(key, by = 1)
        @mutex.synchronize { @counts[key] += by }
      end

      # One more of reason in the tally (:bad_messages, ...).
      def tally(tally, reason)
        @mutex.synchronize { @counts[tally][reason] += 1 }
      end

      # A copy of every counter.
      def to_h
        @mutex.synchronize { @counts.transform_values { |v| v.is_a?(Hash) ? v.dup : v } }
      end

      # Logs the block's message at warn the first time key is seen; true then.
      def warn_once(key)
        first = @logged_mutex.synchronize { @logged.add?(key) }
        @logger.warn("tasker worker #{@worker_id}: #{yield}") if first
        !first.nil?
      end

      # Bad input is counted and logged once per reason.
      def bad(reason, detail)
        tally(:bad_messages, reason)
        warn_once(reason) { "dropped a bad message (#{reason}): #{detail}; further #{reason} messages are only counted" }
      end
    end
  end
end
