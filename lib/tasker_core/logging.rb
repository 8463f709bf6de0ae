# frozen_string_literal: true

require "logger"
require "json"
require "time"

# One logger for the whole gem. By default a stdlib Logger whose level and
# format follow logging.level and logging.format, on $stdout when $stdout is a
# terminal (a foreground process) and on $stderr otherwise (so a command's
# output on a pipe stays clean); set TaskerCore.logger = Rails.logger (or any
# Logger-like object) to send everything there instead, at that logger's own
# level and format.
module TaskerCore
  # ISO 8601, UTC, milliseconds: every time the CLI and the logs print.
  def self.iso8601(time) = time&.utc&.round(3)&.iso8601(3)

  module Logging
    # A message with fields (task_id:, step_id:, step_name:, attempt:,
    # worker_id:, ...). The gem's JSON format writes the fields as keys; any
    # other formatter (Rails' included, which calls #inspect on a non-String)
    # gets "message key=value ...".
    class Event
      attr_reader :message, :fields

      def initialize(message, fields)
        @message = message
        @fields = fields.compact
      end

      def to_s
        return @message if @fields.empty?

        "#{@message} #{@fields.map { |k, v| "#{k}=#{v}" }.join(' ')}"
      end
      alias inspect to_s
    end

    # "2026-11-30T06:06:05.123Z  WARN tasker_core[4321]: step failed: ... task_id=7 step_id=31"
    class TextFormatter
      def call(severity, time, progname, msg)
        "#{TaskerCore.iso8601(time)} #{severity.rjust(5)} #{progname || 'tasker_core'}[#{Process.pid}]: " \
          "#{Logging.text(msg)}\n"
      end
    end

    # One JSON object per line: time, level, pid, progname, message and an
    # Event's fields.
    class JSONFormatter
      def call(severity, time, progname, msg)
        entry = { "time" => TaskerCore.iso8601(time), "level" => severity.downcase, "pid" => Process.pid,
                  "progname" => progname || "tasker_core" }
        if msg.is_a?(Event)
          entry["message"] = msg.message
          msg.fields.each { |k, v| entry[k.to_s] = v unless entry.key?(k.to_s) }
        else
          entry["message"] = Logging.text(msg)
        end
        "#{JSON.generate(entry)}\n"
      rescue JSON::GeneratorError, EncodingError
        "#{JSON.generate(entry.merge('message' => Logging.text(msg).scrub))}\n"
      end
    end

    FORMATTERS = { "text" => TextFormatter, "json" => JSONFormatter }.freeze

    module_function

    def event(message, **fields) = Event.new(message, fields)

    def text(msg)
      case msg
      when String then msg
      when Exception then "#{msg.message} (#{msg.class})"
      else msg.to_s
      end
    end
  end

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
      logging = begin
        config.logging
      rescue ConfigurationError
        # The error surfaces where the configuration is used; logging it must still work.
        { "level" => "info", "format" => "text" }
      end
      @own_logger = true
      io = $stdout.respond_to?(:tty?) && $stdout.tty? ? $stdout : $stderr
      Logger.new(io, progname: "tasker_core", level: logging["level"],
                     formatter: Logging::FORMATTERS.fetch(logging["format"] || "text").new)
    end

    # Called whenever a configuration is installed.
    def apply_logging_config(config)
      logger = @logger
      return unless logger && @own_logger

      logger.level = config.logging["level"]
      logger.formatter = Logging::FORMATTERS.fetch(config.logging["format"]).new
    end
  end
end
