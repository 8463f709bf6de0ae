# frozen_string_literal: true

module TaskerCore
  module Worker
    # Everything a worker is configured with, built once (configuration plus
    # keyword overrides), checked and frozen, then handed to each part. No
    # part reads TaskerCore.config itself.
    #
    # Times are in seconds here (the configuration's *_ms keys divided once).
    Settings = Struct.new(:worker_id, :batch_endpoint, :result_endpoint, :max_workers, :prefetch, :heartbeat_interval_s,
                          :step_timeout_s, :shutdown_timeout_s, :timeout_grace_s, :reopen_grace_s, :send_hwm,
                          :recv_hwm, :linger_ms, :curve, :max_message_bytes, :max_batch_steps, :max_payload_depth,
                          :max_result_bytes, :queues, keyword_init: true)

    class Settings
      # How long a timed-out handler gets to unwind after the interrupt before
      # its thread is given up on and replaced.
      TIMEOUT_GRACE_S = 1.0
      # A socket that reported `disconnected` and no `connected` within this
      # long is closed and opened again (Connection#reopen_dead_sockets).
      REOPEN_GRACE_S = 0.5

      # The keyword arguments of BatchStepExecutionOrchestrator.new, each
      # defaulting to its configuration key (read when called).
      def self.build(config: TaskerCore.config, worker_id: nil, curve: :config, step_sub_endpoint: :config,
                     result_pub_endpoint: :config, timeout_grace_s: TIMEOUT_GRACE_S, reopen_grace_s: REOPEN_GRACE_S,
                     **overrides)
        unknown = overrides.keys - CONFIG_KEYS.keys
        raise ArgumentError, "unknown keyword#{'s' if unknown.size > 1}: #{unknown.map(&:inspect).join(', ')}" if unknown.any?

        v = CONFIG_KEYS.to_h { |name, key| [name, overrides.fetch(name) { config.dig(*key.split(".")) }] }
        id = worker_id || Protocol.generate_worker_id
        raise ArgumentError, "worker_id #{id.inspect} must match #{Protocol::WORKER_ID_PATTERN.source}" unless Protocol.valid_worker_id?(id)

        max_workers = v[:max_workers]
        raise ArgumentError, "max_workers must be a positive Integer" unless max_workers.is_a?(Integer) && max_workers.positive?
        prefetch = Config::SCHEMA.fetch("worker.prefetch") # the command line is held to the schema's bounds too
        unless v[:prefetch].is_a?(Integer) && v[:prefetch].between?(prefetch.min, prefetch.max)
          raise ArgumentError, "prefetch must be an Integer between #{prefetch.min} and #{prefetch.max}"
        end

        new(worker_id: id, max_workers: max_workers, prefetch: v[:prefetch],
            batch_endpoint: step_sub_endpoint == :config ? config.dig("zeromq", "batch_endpoint") : step_sub_endpoint,
            result_endpoint: result_pub_endpoint == :config ? config.dig("zeromq", "result_endpoint") : result_pub_endpoint,
            heartbeat_interval_s: v[:heartbeat_interval_ms] / 1000.0, step_timeout_s: v[:step_timeout_ms] / 1000.0,
            shutdown_timeout_s: v[:shutdown_timeout_ms] / 1000.0, timeout_grace_s: timeout_grace_s,
            reopen_grace_s: reopen_grace_s, send_hwm: v[:send_hwm], recv_hwm: v[:recv_hwm], linger_ms: v[:linger_ms],
            # CURVE client keys ({server_key:, public_key:, secret_key:}) or
            # nil; read now so a bad key file fails here, not in the I/O thread.
            curve: curve == :config ? TaskerCore::Curve.client_options(config) : curve,
            max_message_bytes: v[:max_message_bytes], max_batch_steps: v[:max_batch_steps],
            max_payload_depth: v[:max_payload_depth], max_result_bytes: v[:max_result_bytes],
            queues: Queues.list(v[:queues])).freeze
      end

      # Keyword => the dotted configuration key it defaults to.
      CONFIG_KEYS = {
        max_workers: "worker.max_workers", prefetch: "worker.prefetch", heartbeat_interval_ms: "zeromq.heartbeat_interval_ms",
        step_timeout_ms: "worker.step_timeout_ms", shutdown_timeout_ms: "worker.shutdown_timeout_ms",
        send_hwm: "zeromq.send_hwm", recv_hwm: "zeromq.recv_hwm", linger_ms: "zeromq.linger_ms",
        max_message_bytes: "zeromq.max_message_bytes", max_batch_steps: "zeromq.max_batch_steps",
        max_payload_depth: "zeromq.max_payload_depth", max_result_bytes: "zeromq.max_result_bytes",
        queues: "worker.queues"
      }.freeze

      # The orchestrator's limits for results when a batch carries none
      # (older orchestrators): this worker's own.
      def own_result_limits
        { max_result_bytes: max_result_bytes, max_message_bytes: max_message_bytes,
          max_payload_depth: max_payload_depth }.compact.freeze
      end

      # What this worker accepts in one batch (the heartbeat's "limits").
      def advertised_limits
        limits = { max_batch_steps: max_batch_steps, max_message_bytes: max_message_bytes,
                   max_payload_depth: max_payload_depth }
        limits.values.all? { |x| x.is_a?(Integer) && x.positive? } ? limits : nil
      end

      # The steps this worker takes at once: its threads, and the steps that
      # may wait in its queue for one (the heartbeat's "capacity").
      def capacity = max_workers + prefetch

      # Never shows the CURVE secret key.
      def inspect
        "#<#{self.class.name} worker_id=#{worker_id.inspect} max_workers=#{max_workers} prefetch=#{prefetch} " \
          "queues=#{queues.inspect} curve=#{!curve.nil?}>"
      end
      alias to_s inspect
    end
  end
end
