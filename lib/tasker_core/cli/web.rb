# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker web --port N: the dashboard (TaskerCore::Web) on its own.
    class Web < Command
      DESCRIPTION = <<~TEXT.chomp
        Serves the dashboard (tasks, steps, workers, /metrics) over HTTP until TERM or INT.
        It listens on 127.0.0.1 unless --host says otherwise and has no login of its own:
        put it behind one (README: Dashboard) before exposing it.
      TEXT
      SIGNALS = %w[TERM INT].freeze

      private

      def define_options(o)
        @options[:port] = 9292
        @options[:host] = "127.0.0.1"
        o.on("--port N", Integer, "port to listen on (default 9292; 0 = any free port)") { |v| @options[:port] = v }
        o.on("--host HOST", "address to listen on (default 127.0.0.1)") { |v| @options[:host] = v }
        o.on("--read-only", "show everything, allow no action") { @options[:read_only] = true }
      end

      def call(_args)
        raise UsageError, "--port must be between 0 and 65535" unless (0..65_535).cover?(@options[:port])

        require_relative "../web"
        require_relative "../web/server"
        url = database_url!
        db = config.database
        Store.pool = Store::Pool.new(url: url, size: db["pool"], connect_timeout: db["connect_timeout_s"],
                                     statement_timeout_ms: db["statement_timeout_ms"])
        app = TaskerCore::Web.new(read_only: @options[:read_only] || false)
        signal_r, signal_w = IO.pipe
        previous = SIGNALS.to_h { |s| [s, trap(s) { signal_w.write_nonblock(s[0], exception: false) }] }
        server = TaskerCore::Web::Server.new(app, port: @options[:port], host: @options[:host]).start
        err.puts "tasker web: serving the dashboard on #{server.url}/#{' (read-only)' if @options[:read_only]}; " \
                 "TERM or INT stops it"
        err.flush
        IO.select([signal_r])
        server.stop
        err.puts "tasker web: stopped"
        EXIT_OK
      rescue Errno::EADDRINUSE => e
        raise Error, "cannot listen on #{@options[:host]}:#{@options[:port]}: #{e.message}"
      ensure
        previous&.each { |s, h| trap(s, h || "DEFAULT") }
        signal_r&.close
        signal_w&.close
      end
    end
  end
end
