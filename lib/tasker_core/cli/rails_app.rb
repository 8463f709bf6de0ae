# frozen_string_literal: true

module TaskerCore
  class CLI
    # `tasker worker` and `tasker orchestrator` inside a Rails app: the app
    # is booted first (config/environment.rb of the current directory, or
    # of --app DIR), so handlers autoload, the configuration and the
    # database are the app's, and logs go to the app's logger (and to stdout
    # too when it is a terminal). An app already loaded (bin/tasker requires
    # config/environment.rb itself) is used as it is.
    module RailsApp
      ENVIRONMENT = File.join("config", "environment.rb")

      def self.root_for(dir)
        dir && File.file?(File.join(dir, ENVIRONMENT)) ? File.expand_path(dir) : nil
      end

      # True when a Rails app is loaded (now or before).
      def self.loaded? = defined?(::Rails.application) && ::Rails.application&.initialized? ? true : false

      # Loads the app at root; returns true.
      def self.boot!(root)
        unless loaded?
          # tasker_core was loaded before Rails (exe/tasker): its Railtie must
          # be defined before the app initializes, under the app's bundle.
          boot = File.join(root, "config", "boot.rb")
          require boot if File.file?(boot)
          require "rails"
          require_relative "../railtie"
          require File.join(root, ENVIRONMENT)
        end
        log_to_stdout if $stdout.tty?
        true
      end

      # The app's logger, plus stdout (what `rails server` does in a terminal).
      def self.log_to_stdout
        logger = ::Rails.logger
        return if logger.nil? || ::ActiveSupport::Logger.logger_outputs_to?(logger, $stdout)

        console = ::ActiveSupport::Logger.new($stdout)
        console.formatter = logger.formatter
        console.level = logger.level
        if logger.respond_to?(:broadcast_to)
          logger.broadcast_to(console)
        else
          logger.extend(::ActiveSupport::Logger.broadcast(console))
        end
      end

      private

      def define_app_option(o)
        o.on("--app DIR", "the Rails app to boot (default: the current directory when it has #{ENVIRONMENT})") { |v| @options[:app] = v }
      end

      def configure!
        root = @options[:app] ? RailsApp.root_for(@options[:app]) : RailsApp.root_for(Dir.pwd)
        raise UsageError, "--app #{@options[:app]}: no #{ENVIRONMENT} there" if @options[:app] && root.nil?

        @rails_app = RailsApp.boot!(root) if root || RailsApp.loaded?
        super
      end

      def rails_app? = @rails_app ? true : false
    end
  end
end
