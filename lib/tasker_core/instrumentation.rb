# frozen_string_literal: true

module TaskerCore
  # Events, for metrics and logs: plain Ruby subscribers always, and
  # ActiveSupport::Notifications ("<event>.tasker_core") when ActiveSupport
  # is loaded.
  #
  #   TaskerCore.subscribe(:step_completed) { |payload| StatsD.increment("steps") }
  #   ActiveSupport::Notifications.subscribe("step_failed.tasker_core") { |event| ... }
  #
  # Events and where they are emitted:
  #   task_created     TaskerCore.create_task          {task_id:, name:, namespace:, version:, identity_key:}
  #   step_started     a worker, before the handler    {step_id:, task_id:, step_name:, handler:, attempt:, worker_id:, batch_id:}
  #   step_completed   a worker, after the handler     same + {duration_ms:}
  #   step_failed      a worker, handler raised/timed out  same + {duration_ms:, error_class:, error_message:, retryable:}
  #   batch_dispatched the orchestrator's process      {count:, steps:} (from the loop's stats, see Instrumentation::LoopStatsPoller)
  #   worker_lost      the orchestrator's process      {worker_id:, reason:, in_flight:}
  #
  # A subscriber runs in the thread that emits (a worker's pool thread, the
  # caller of create_task): keep it short. An exception in a subscriber is
  # logged and never reaches the emitter.
  module Instrumentation
    EVENTS = %i[task_created step_started step_completed step_failed batch_dispatched worker_lost].freeze
    NAMESPACE = "tasker_core"

    Subscription = Struct.new(:event, :block)

    @subscriptions = []
    @lock = Mutex.new

    class << self
      # event: one of EVENTS, or nil for every event (the block then gets
      # (event, payload)). Returns a handle for #unsubscribe.
      def subscribe(event = nil, &block)
        raise ArgumentError, "subscribe needs a block" unless block

        event = event&.to_sym
        raise ArgumentError, "unknown event #{event.inspect} (known: #{EVENTS.join(', ')})" if event && !EVENTS.include?(event)

        sub = Subscription.new(event, block)
        @lock.synchronize { @subscriptions = [*@subscriptions, sub] }
        sub
      end

      def unsubscribe(subscription)
        @lock.synchronize { @subscriptions = @subscriptions.reject { |s| s.equal?(subscription) } }
        nil
      end

      def clear!
        @lock.synchronize { @subscriptions = [] }
      end

      # Anyone listening (plain or ActiveSupport)? Lets emitters skip building payloads.
      def listening?(event)
        @subscriptions.any? { |s| s.event.nil? || s.event == event } || notifier_listening?(event)
      end

      def instrument(event, payload = {})
        event = event.to_sym
        subs = @subscriptions # copy-on-write: no lock on the hot path
        subs.each do |s|
          next unless s.event.nil? || s.event == event

          begin
            s.event ? s.block.call(payload) : s.block.call(event, payload)
          rescue StandardError => e
            TaskerCore.logger.error("tasker_core: #{event} subscriber raised #{e.class}: #{e.message}")
          end
        end
        notify_active_support(event, payload)
        nil
      end

      private

      def notifier
        defined?(::ActiveSupport::Notifications) ? ::ActiveSupport::Notifications : nil
      end

      def notifier_listening?(event)
        n = notifier
        n ? n.notifier.listening?("#{event}.#{NAMESPACE}") : false
      end

      def notify_active_support(event, payload)
        n = notifier
        return unless n

        n.instrument("#{event}.#{NAMESPACE}", payload)
      rescue StandardError => e
        TaskerCore.logger.error("tasker_core: ActiveSupport subscriber of #{event} raised #{e.class}: #{e.message}")
      end
    end

    # What the Ruby side can see of a native orchestration loop: it polls
    # handle.stats["loop"] and emits batch_dispatched with the number of
    # steps sent since the last poll (the loop runs no Ruby, so it cannot
    # call subscribers per batch), and worker_lost for workers that vanished
    # from handle.workers between polls (the reason is not visible here:
    # "gone").
    class LoopStatsPoller
      def initialize(handle, interval: 1.0)
        @handle = handle
        @interval = interval
        @last_dispatched = nil
        @last_workers = nil
      end

      def start
        @thread = Thread.new do
          loop do
            poll
            sleep @interval
          end
        rescue ClosedError, ForkSafetyError
          nil
        end
        @thread.name = "tasker-instrumentation"
        self
      end

      def stop
        @thread&.kill&.join
        nil
      end

      def poll
        stats = @handle.stats
        dispatched = stats.dig("loop", "dispatched")
        if dispatched
          delta = @last_dispatched ? dispatched - @last_dispatched : 0
          @last_dispatched = dispatched
          Instrumentation.instrument(:batch_dispatched, count: delta, steps: dispatched) if delta.positive?
        end
        workers = @handle.workers.to_h { |w| [w["id"], w] }
        (@last_workers || {}).each do |id, w|
          next if workers.key?(id)

          Instrumentation.instrument(:worker_lost, worker_id: id, reason: "gone", in_flight: w["in_flight"])
        end
        @last_workers = workers
      end
    end

    # Manual mode (handle.receive_results without the loop): pass each
    # received message through this to emit worker_lost as reported by the
    # handle. Returns the message.
    def self.observe_result(msg)
      if msg.is_a?(Hash) && msg["type"] == "worker_lost"
        instrument(:worker_lost, worker_id: msg["worker_id"], reason: msg["reason"], in_flight: Array(msg["in_flight"]).size)
      end
      msg
    end
  end

  # Manual mode: worker_lost as the handle reports it from receive_results.
  module ReceiveResultsInstrumentation
    def receive_results(*args, **kwargs)
      results = super
      results.each { |m| Instrumentation.observe_result(m) } if results.is_a?(Array) && Instrumentation.listening?(:worker_lost)
      results
    end
  end
  OrchestrationHandle.prepend(ReceiveResultsInstrumentation) if defined?(OrchestrationHandle)

  class << self
    def subscribe(event = nil, &block) = Instrumentation.subscribe(event, &block)
    def unsubscribe(subscription) = Instrumentation.unsubscribe(subscription)
  end
end
