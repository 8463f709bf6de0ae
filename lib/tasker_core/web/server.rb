# frozen_string_literal: true

require "webrick"
begin
  require "rackup/handler/webrick" # rack 3: the handlers moved to the rackup gem
rescue LoadError
  require "rack/handler/webrick" # rack 2 (Rails 7.0) still has them
end

module TaskerCore
  class Web
    # A WEBrick server for a Rack app on a thread of this process: `tasker
    # web` (the dashboard) and `tasker orchestrator --metrics-port` (its
    # /metrics next to the loop, where the handle's counters are).
    class Server
      attr_reader :port

      def initialize(app, port:, host: "127.0.0.1", logger: TaskerCore.logger)
        @app = app
        @host = host
        @port = port
        @logger = logger
        @server = nil
      end

      # Binds, then serves on a thread; returns self once listening.
      def start
        ready = Queue.new
        @thread = Thread.new do
          handler = defined?(::Rackup::Handler::WEBrick) ? ::Rackup::Handler::WEBrick : ::Rack::Handler::WEBrick
          handler.run(@app, Host: @host, Port: @port, AccessLog: [], Logger: WEBrick::Log.new(File::NULL),
                            StartCallback: -> { ready << :ok }) { |s| @server = s }
        rescue StandardError => e
          ready << e
        end
        result = ready.pop
        raise result if result.is_a?(Exception)

        @port = @server.listeners.first.addr[1]
        self
      end

      def url = "http://#{@host.include?(':') ? "[#{@host}]" : @host}:#{@port}"

      def stop
        @server&.shutdown
        @thread&.join(5)
        nil
      end
    end
  end
end
