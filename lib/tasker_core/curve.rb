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
    # log_refusals: one warning per (key, domain) per window, and at most
    # REFUSAL_KEYS_PER_WINDOW keys named per window; the rest are counted.
    REFUSAL_WINDOW_S = 60
    REFUSAL_KEYS_PER_WINDOW = 20

    @refusal_lock = Mutex.new
    @refusals_warned = {} # [public_key, domain] => when it was last named (monotonic s)
    @refusals_quiet = 0   # refusals not named since the last summary
    @refusals_summary_at = nil

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

      # The key in a key file (the first line holding one). A key file
      # readable or writable by group or others is refused (secret: false
      # only changes the wording).
      def read_key_file(path, secret: true)
        check_private!(path, secret ? "CURVE secret key file" : "CURVE key file")
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
      # The file is refused like a key file when group or others may read or
      # write it: whoever can write it decides who may connect.
      def read_key_list(path)
        check_private!(path, "allowed client keys file")
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

      # Logs the handshakes the ZAP handler refused since the last call
      # (take_refusals), rate-limited: one warning per public key and domain
      # per REFUSAL_WINDOW_S naming the key, at most REFUSAL_KEYS_PER_WINDOW
      # keys a window, and the rest counted in one summary line a window.
      # Returns the number of refusals taken.
      def log_refusals(logger = TaskerCore.logger, now: Process.clock_gettime(Process::CLOCK_MONOTONIC))
        refusals = take_refusals
        @refusal_lock.synchronize do
          @refusals_warned.delete_if { |_, at| now - at >= REFUSAL_WINDOW_S }
          refusals.each do |r|
            id = [r[:public_key], r[:domain]]
            if r[:public_key].nil? || @refusals_warned.key?(id) || @refusals_warned.size >= REFUSAL_KEYS_PER_WINDOW
              @refusals_quiet += r[:count]
              next
            end
            @refusals_warned[id] = now
            logger&.warn("tasker_core: refused #{r[:count]} CURVE handshake(s) from public key #{r[:public_key]} " \
                         "(ZAP domain #{r[:domain]}): not on the allow-list")
          end
          if @refusals_quiet.positive? && (@refusals_summary_at.nil? || now - @refusals_summary_at >= REFUSAL_WINDOW_S)
            logger&.warn("tasker_core: refused #{@refusals_quiet} more CURVE handshake(s) (keys already named in the " \
                         "last #{REFUSAL_WINDOW_S} s, clients without a key, or too many keys to name)")
            @refusals_quiet = 0
            @refusals_summary_at = now
          end
        end
        refusals.sum { |r| r[:count] }
      end

      def enabled?(config = TaskerCore.config)
        config.dig("zeromq", "curve", "enabled") == true
      end

      # Keyword arguments for OrchestrationHandle.new: the server's secret
      # key and the allow-list; only the message limits without CURVE (a
      # non-loopback bind is then refused by TaskerCore::BindPolicy unless
      # zeromq.allow_insecure).
      def handle_options(config = TaskerCore.config)
        zeromq = config.dig("zeromq") || {}
        limits = { max_message_bytes: zeromq["max_message_bytes"], max_result_bytes: zeromq["max_result_bytes"] }.compact
        return limits unless enabled?(config)

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

      private

      # A file holding keys or deciding who may connect: mode 0600 or stricter.
      def check_private!(path, what)
        mode = File.stat(path).mode & 0o7777
        return if (mode & 0o077).zero?

        raise ConfigurationError, "#{what} #{path} is readable or writable by group or others " \
                                  "(mode #{format('%04o', mode)}); run `chmod 600 #{path}`"
      end

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
