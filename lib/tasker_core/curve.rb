# frozen_string_literal: true

require "socket"

module TaskerCore
  # CurveZMQ key handling (docs/security.md). The C half (keypair,
  # public_key, valid_key?, allow, zap_counts, ...) comes from the extension
  # (ext/tasker_core/curve_class.c); here: key files, the environment, and
  # turning zeromq.curve.* settings into socket and handle options.
  #
  # Secret keys come from a file (mode 0600 or stricter, else
  # ConfigurationError) or an environment variable. They are never logged,
  # never put in an exception message and never kept in TaskerCore.config.
  module Curve
    SERVER_SECRET_ENV = "TASKER_CURVE_SERVER_SECRET_KEY"
    CLIENT_SECRET_ENV = "TASKER_CURVE_CLIENT_SECRET_KEY"
    Z85_PATTERN = %r{\A[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\z}

    @warned_exposed = false
    @warn_lock = Mutex.new

    class << self
      # Writes "<prefix>.key" (secret) and "<prefix>.pub" (public), both
      # created with mode 0600, refusing to overwrite unless force.
      # Returns [public_path, secret_path, public_key].
      def write_keypair(prefix, force: false)
        public_key, secret_key = keypair
        secret_path = "#{prefix}.key"
        public_path = "#{prefix}.pub"
        write_private(secret_path, "# tasker_core CURVE secret key: keep it secret (mode 0600)\n#{secret_key}\n", force)
        write_private(public_path, "# tasker_core CURVE public key\n#{public_key}\n", force)
        [public_path, secret_path, public_key]
      ensure
        secret_key&.replace("\0" * secret_key.bytesize) unless secret_key&.frozen?
      end

      # The key in a key file (the first line holding one). A secret key file
      # readable by group or others is refused.
      def read_key_file(path, secret: true)
        stat = File.stat(path)
        if secret && (stat.mode & 0o077) != 0
          raise ConfigurationError,
                "CURVE secret key file #{path} is readable by group or others (mode #{format('%04o', stat.mode & 0o7777)}); " \
                "run `chmod 600 #{path}`"
        end
        key = File.foreach(path).filter_map { |l| l.split.first }.find { |t| valid_key?(t) }
        unless key
          raise ConfigurationError, "#{path} does not hold a CURVE key (40 Z85 characters on one line)"
        end

        key
      rescue SystemCallError => e
        raise ConfigurationError, "cannot read CURVE key file #{path}: #{e.message}"
      end

      # Public keys, one per line; a line may end in a comment after
      # whitespace, and lines starting with "#" that hold no key are
      # comments ("#" is itself a Z85 character, so a key may start with it).
      def read_key_list(path)
        File.foreach(path).each_with_index.filter_map do |line, i|
          token = line.split.first
          next if token.nil?
          next token if valid_key?(token)
          next if token.start_with?("#")

          raise ConfigurationError, "#{path}: line #{i + 1} is not a CURVE public key (40 Z85 characters)"
        end
      rescue SystemCallError => e
        raise ConfigurationError, "cannot read allowed client keys file #{path}: #{e.message}"
      end

      def enabled?(config = TaskerCore.config)
        config.dig("zeromq", "curve", "enabled") == true
      end

      # Keyword arguments for OrchestrationHandle.new: the server's secret
      # key and the allow-list; {} without CURVE. Also warns (once per
      # process) when plain TCP is bound to a non-loopback address.
      def handle_options(config = TaskerCore.config)
        zeromq = config.dig("zeromq") || {}
        limits = { max_message_bytes: zeromq["max_message_bytes"], max_result_bytes: zeromq["max_result_bytes"] }.compact
        unless enabled?(config)
          warn_if_exposed([zeromq["batch_endpoint"], zeromq["result_endpoint"]].compact)
          return limits
        end
        require_available!
        limits.merge(curve_secret_key: server_secret_key(config), curve_allowed_client_keys: allowed_client_keys(config))
      end

      # { server_key:, public_key:, secret_key: } for a worker's sockets, or
      # nil without CURVE.
      def client_options(config = TaskerCore.config)
        return nil unless enabled?(config)

        require_available!
        curve = config.dig("zeromq", "curve")
        server_key = curve["server_public_key"] or
          raise ConfigurationError, "zeromq.curve.enabled is true but zeromq.curve.server_public_key is not set"
        secret = secret_from(CLIENT_SECRET_ENV, curve["client_secret_key_file"], "client")
        public_key = curve["client_public_key"] || public_key(secret)
        { server_key: server_key, public_key: public_key, secret_key: secret }
      end

      def server_secret_key(config = TaskerCore.config)
        secret_from(SERVER_SECRET_ENV, config.dig("zeromq", "curve", "server_secret_key_file"), "server")
      end

      # zeromq.curve.allowed_client_keys plus the keys in allowed_client_keys_file.
      def allowed_client_keys(config = TaskerCore.config)
        curve = config.dig("zeromq", "curve")
        keys = Array(curve["allowed_client_keys"]).dup
        keys.concat(read_key_list(curve["allowed_client_keys_file"])) if curve["allowed_client_keys_file"]
        keys.each do |k|
          raise ConfigurationError, "zeromq.curve.allowed_client_keys: #{k.inspect} is not a CURVE public key" unless valid_key?(k)
        end
        keys.uniq
      end

      # True for endpoints only this host can reach.
      def loopback_endpoint?(endpoint)
        return true if endpoint.start_with?("ipc://", "inproc://")

        host = endpoint[%r{\Atcp://(\[[^\]]*\]|[^:]*):}, 1].to_s.delete("[]")
        return true if host == "localhost"
        return false if host.empty? || host == "*"

        require "ipaddr"
        IPAddr.new(host).loopback?
      rescue IPAddr::Error
        false # an interface name or a host name: assume it is reachable from outside
      end

      # Logs one warning per process when any endpoint is not loopback.
      def warn_if_exposed(endpoints)
        exposed = endpoints.reject { |e| loopback_endpoint?(e) }
        return false if exposed.empty?

        @warn_lock.synchronize do
          return false if @warned_exposed

          @warned_exposed = true
        end
        TaskerCore.logger.warn("tasker_core: binding #{exposed.join(' and ')} without CURVE: anyone who can reach " \
                               "these ports can receive batches and send results. Set zeromq.curve.enabled " \
                               "(docs/security.md) or bind to 127.0.0.1.")
        true
      end

      def reset_warning!
        @warn_lock.synchronize { @warned_exposed = false }
      end

      private

      def require_available!
        return if available?

        raise ConfigurationError, "zeromq.curve.enabled is true but this libzmq has no CURVE support " \
                                  "(zmq_has(\"curve\") is false; Debian's libzmq5 has it)"
      end

      def secret_from(env_name, file, role)
        from_env = ENV[env_name]
        key = if from_env && !from_env.empty?
                raise ConfigurationError, "#{env_name} does not hold a CURVE secret key (40 Z85 characters)" unless valid_key?(from_env)

                from_env.dup
              elsif file
                read_key_file(file)
              end
        return key if key

        setting = "zeromq.curve.#{role}_secret_key_file"
        raise ConfigurationError, "zeromq.curve.enabled is true but no #{role} secret key is given: set #{setting} " \
                                  "or #{env_name} (`tasker keygen` writes a key pair)"
      end

      def write_private(path, text, force)
        flags = File::WRONLY | File::CREAT | (force ? File::TRUNC : File::EXCL)
        File.open(path, flags, 0o600) do |f|
          f.chmod(0o600) # an existing file keeps its old mode otherwise
          f.write(text)
        end
      rescue Errno::EEXIST
        raise ConfigurationError, "#{path} already exists; pass --force to overwrite it"
      end
    end
  end
end
