# frozen_string_literal: true

module TaskerCore
  # Running orchestration in this process: the native loop that claims ready
  # steps, sends them to workers and writes their results back. One per
  # process (it binds zeromq.batch_endpoint and zeromq.result_endpoint);
  # `tasker orchestrator` runs it in the foreground.
  #
  #   TaskerCore::Orchestrator.start     # registers under discovery.name when set
  #   TaskerCore::Orchestrator.running?  # => true
  #   TaskerCore::Orchestrator.stop      # results written back, in-flight steps released
  #
  # TaskerCore::Internal::OrchestrationManager.instance is the same thing
  # under its older name.
  module Orchestrator
    class << self
      # Options as OrchestrationHandle#start_orchestration takes them
      # (database_url:, batch_size:, poll_interval_ms:, owner:, ...); the
      # database defaults to database.url / DATABASE_URL (under Rails with
      # ActiveRecord, the app's database). Returns self.
      def start(**options)
        manager.start_orchestration(**options)
        self
      end

      # Stops the loop; true when it stopped within timeout_ms.
      def stop(timeout_ms: 10_000) = manager.stop_orchestration(timeout_ms: timeout_ms)

      def running? = manager.orchestrating?

      # The loop's counters (OrchestrationHandle#stats).
      def stats = manager.orchestration_handle.stats

      private

      def manager = Internal::OrchestrationManager.instance
    end
  end
end
