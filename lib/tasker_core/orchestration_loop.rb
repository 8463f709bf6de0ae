# frozen_string_literal: true

require "securerandom"
require "socket"

module TaskerCore
  # The native orchestration loop's Ruby face: defaults from config for
  # OrchestrationHandle#start_orchestration (the loop itself is C, in
  # ext/tasker_core/orchestration_loop.c, and runs no Ruby).
  class OrchestrationHandle
    # Starts a native thread that takes over this handle's sockets and opens
    # its own PostgreSQL connection: it claims ready steps, sends them to
    # live workers by free capacity, and writes results back in batches.
    # While it runs, #publish_batch and #receive_results raise; #workers and
    # #stats ("loop" key) stay available from any thread.
    def start_orchestration(database_url: nil, owner: nil, batch_size: nil, lease_ms: nil, poll_interval_ms: 50)
      url = database_url || self.class.configured_database_url
      if url.nil? || url.empty?
        raise ConfigurationError, "no database to orchestrate from: set DATABASE_URL (or database.url in the " \
                                  "config), e.g. to the embedded cluster bin/setup starts"
      end

      orchestration = TaskerCore.respond_to?(:config) ? (TaskerCore.config.orchestration || {}) : {}
      _start_orchestration(url, owner || self.class.default_owner,
                           Integer(batch_size || orchestration.fetch("batch_size", 100)),
                           Integer(lease_ms || orchestration.fetch("dispatch_timeout_ms", 10_000)),
                           Integer(poll_interval_ms))
    end

    class << self
      def configured_database_url
        url = TaskerCore.config.dig("database", "url") if TaskerCore.respond_to?(:config)
        url = ENV["DATABASE_URL"] if url.nil? || url.empty?
        url
      end

      # Unique per process and start, so two orchestrators never share claims.
      def default_owner = "#{::Socket.gethostname[0, 60]}-#{Process.pid}-#{SecureRandom.hex(4)}"
    end
  end
end
