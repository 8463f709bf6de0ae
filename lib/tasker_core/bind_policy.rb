# frozen_string_literal: true

require "ipaddr"

module TaskerCore
  # Secure by default (docs/security.md): an orchestrator does not bind an
  # address other hosts can reach without CURVE, unless told to with
  # allow_insecure: (zeromq.allow_insecure). Without CURVE anyone who can
  # reach the ports takes batches (contexts included) and sends results that
  # are applied.
  #
  # Prepended to OrchestrationHandle, so the keywords are checked before the
  # C initialize binds anything.
  module BindPolicy
    # allow_insecure: true permits a non-loopback bind without CURVE; nil
    # (the default) takes zeromq.allow_insecure from TaskerCore.config.
    def initialize(allow_insecure: nil, **opts)
      BindPolicy.check!(opts, allow_insecure: allow_insecure)
      super(**opts)
    end

    class << self
      # Raises ConfigurationError naming the endpoint(s) and the setting when
      # OrchestrationHandle.new keywords `opts` would bind a non-loopback
      # address without CURVE and insecure binds are not allowed.
      def check!(opts, allow_insecure: nil)
        allow_insecure = configured_allow_insecure if allow_insecure.nil?
        unless [true, false].include?(allow_insecure)
          raise ArgumentError, "allow_insecure must be true, false or nil, got #{allow_insecure.inspect}"
        end
        return if allow_insecure || !binds?(opts) || !opts[:curve_secret_key].nil?

        exposed = opts.values_at(:batch_endpoint, :result_endpoint).compact.reject { |e| loopback_endpoint?(e.to_s) }
        return if exposed.empty?

        raise ConfigurationError,
              "refusing to bind #{exposed.join(' and ')} without CURVE: anyone who can reach #{exposed.size == 1 ? 'it' : 'them'} " \
              "could take batches and send results. Enable zeromq.curve (docs/security.md), bind to 127.0.0.1, " \
              "or set zeromq.allow_insecure: true (OrchestrationHandle.new(allow_insecure: true)) to accept that."
      end

      # True for endpoints only this host can reach: 127.0.0.0/8, ::1,
      # localhost, ipc:// and inproc://. "*", 0.0.0.0, other addresses,
      # interface and host names are reachable from outside.
      def loopback_endpoint?(endpoint)
        return true if endpoint.start_with?("ipc://", "inproc://")

        host = endpoint[%r{\Atcp://(\[[^\]]*\]|[^:]*):}, 1].to_s.delete("[]")
        return true if host == "localhost"
        return false if host.empty? || host == "*"

        IPAddr.new(host).loopback?
      rescue IPAddr::Error
        false
      end

      def configured_allow_insecure
        TaskerCore.config.dig("zeromq", "allow_insecure") == true
      end

      private

      # The C initialize binds unless enabled: is given and falsy.
      def binds?(opts)
        !opts.key?(:enabled) || opts[:enabled]
      end
    end
  end

  OrchestrationHandle.prepend(BindPolicy)
end
