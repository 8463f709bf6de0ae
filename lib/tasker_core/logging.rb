# frozen_string_literal: true

require "logger"

# One logger for the whole gem. By default a stdlib Logger on $stderr whose
# level follows logging.level; set TaskerCore.logger = Rails.logger (or any
# Logger-like object) to send everything there instead, at that logger's own level.
module TaskerCore
  @logger = nil
  @own_logger = false
  @logger_lock = Mutex.new

  class << self
    def logger
      @logger || @logger_lock.synchronize { @logger ||= default_logger }
    end

    # nil goes back to the gem's own logger.
    def logger=(logger)
      @logger_lock.synchronize do
        @logger = logger
        @own_logger = false
      end
    end

    private

    def default_logger
      level = begin
        config.logging["level"]
      rescue ConfigurationError
        # The error surfaces where the configuration is used; logging it must still work.
        "info"
      end
      @own_logger = true
      Logger.new($stderr, progname: "tasker_core", level: level)
    end

    # Called whenever a configuration is installed.
    def apply_logging_config(config)
      logger = @logger
      logger.level = config.logging["level"] if logger && @own_logger
    end
  end
end
