# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker keygen PREFIX
    class Keygen < Command
      ARGUMENTS = "PREFIX"
      ARITY = 1
      DESCRIPTION = <<~TEXT.chomp
        Writes a CurveZMQ key pair: PREFIX.key (the secret key) and PREFIX.pub (the public key),
        both with mode 0600, and prints the public key. Give the orchestrator's public key to
        workers (zeromq.curve.server_public_key) and put each worker's public key on the
        orchestrator's allow-list (zeromq.curve.allowed_client_keys). The secret key is never printed.
      TEXT

      private

      def define_options(o)
        o.on("--force", "overwrite existing key files") { @options[:force] = true }
      end

      # The key pair needs no configuration file.
      def configure! = nil

      def call(args)
        raise Error, "this libzmq has no CURVE support (zmq_has(\"curve\") is false)" unless Curve.available?

        public_path, secret_path, public_key = Curve.write_keypair(args.first, force: @options[:force])
        out.puts "secret key: #{secret_path} (mode 0600; keep it secret)"
        out.puts "public key: #{public_path}"
        out.puts public_key
        EXIT_OK
      end
    end
  end
end
