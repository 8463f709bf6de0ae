# frozen_string_literal: true

module TaskerCore
  class CLI
    # Base of every command: option parsing with the common options, the
    # configuration, the database check and the mapping of errors to exit
    # statuses. A subclass sets ARGUMENTS / DESCRIPTION, adds its options in
    # #define_options and does its work in #call(args) -> exit status (nil = 0).
    class Command
      ARGUMENTS = ""
      DESCRIPTION = ""
      # Positional arguments: exact count, or a Range.
      ARITY = 0

      attr_reader :name, :options, :out, :err

      def initialize(name:, out:, err:, trace: false)
        @name = name
        @out = out
        @err = err
        @trace = trace
        @options = {}
      end

      def run(argv)
        args = parse(argv)
        return help(out) if @options[:help]

        check_arity!(args)
        configure!
        call(args) || EXIT_OK
      rescue UsageError, OptionParser::ParseError => e
        err.puts "tasker #{name}: #{e.message}"
        err.puts "Run `tasker #{name} --help` for its usage."
        EXIT_USAGE
      rescue Interrupt
        err.puts "tasker #{name}: interrupted"
        EXIT_INTERRUPTED
      rescue TaskerCore::Error, SystemCallError, ScriptError => e
        failure(e)
      rescue StandardError => e
        failure(e, prefix: "unexpected #{e.class}: ")
      end

      def parser
        @parser ||= OptionParser.new do |o|
          o.banner = "Usage: tasker #{name}#{" #{self.class::ARGUMENTS}" unless self.class::ARGUMENTS.empty?} [options]"
          unless self.class::DESCRIPTION.empty?
            o.separator ""
            self.class::DESCRIPTION.each_line { |l| o.separator l.chomp }
          end
          o.separator ""
          o.separator "Options:"
          define_options(o)
          o.separator ""
          o.separator "Common options:"
          o.on("--config PATH", "configuration file (default config/tasker-config.yml)") { |v| @options[:config] = v }
          o.on("--env ENV", "configuration environment (default TASKER_ENV, else development)") { |v| @options[:env] = v }
          o.on("--trace", "print backtraces with errors (also TASKER_TRACE=1)") { @trace = true }
          o.on("-h", "--help", "show this help") { @options[:help] = true }
        end
      end

      private

      def define_options(_parser) = nil

      def call(_args)
        raise NotImplementedError
      end

      def parse(argv)
        parser.parse(argv)
      end

      def help(io)
        io.puts parser.help
        EXIT_OK
      end

      def check_arity!(args)
        arity = self.class::ARITY
        ok = arity.is_a?(Range) ? arity.cover?(args.size) : args.size == arity
        return if ok

        if args.size > (arity.is_a?(Range) ? arity.max : arity)
          raise UsageError, "unexpected argument #{args[arity.is_a?(Range) ? arity.max : arity].inspect}"
        end

        raise UsageError, "missing #{self.class::ARGUMENTS.split.reject { |a| a.start_with?("[") }[args.size] || 'argument'}"
      end

      # An --env the configuration file has no section for is a usage error
      # (a misspelt environment would otherwise run on the defaults).
      def configure!
        TaskerCore.configure(path: @options[:config], env: @options[:env])
        env = @options[:env]
        return if env.nil? || config.environments.include?(env)

        named = config.environments.empty? ? "no environments" : config.environments.join(", ")
        guess = DidYouMean::SpellChecker.new(dictionary: config.environments).correct(env).first
        raise UsageError, "unknown environment #{env.inspect}: #{config.path} names #{named}" \
                          "#{" (did you mean #{guess.inspect}?)" if guess}"
      end

      def config = TaskerCore.config

      # The configured database URL; a failure in one sentence when there is none.
      def database_url!
        url = config.database["url"]
        return url if url && !url.empty?
        return "" if %w[PGHOST PGDATABASE PGSERVICE].any? { |v| ENV[v] && !ENV[v].empty? }

        raise ConfigurationError, "no database is configured: set DATABASE_URL (or database.url in the " \
                                  "configuration file) and run `tasker db:migrate`"
      end

      # The store's pool, on the configured database.
      def use_database!
        url = database_url!
        db = config.database
        Store.pool = Store::Pool.new(url: url, size: 2, connect_timeout: db["connect_timeout_s"],
                                     statement_timeout_ms: db["statement_timeout_ms"])
        url
      end

      def integer_arg(value, what)
        Integer(value, 10).tap { |i| raise ArgumentError unless i.positive? }
      rescue ArgumentError, TypeError
        raise UsageError, "#{what} must be a positive integer, got #{value.inspect}"
      end

      # JSON text -> Hash; a failure (exit 1) when it is not a JSON object.
      def json_object(text, option)
        value = JSON.parse(text)
        raise Error, "#{option} must be a JSON object, got #{value.class.name.downcase}" unless value.is_a?(Hash)

        value
      rescue JSON::ParserError => e
        raise Error, "#{option} is not valid JSON (#{e.message.lines.first.strip.sub(/\A\d+: /, '')[0, 120]})"
      end

      def failure(error, prefix: "")
        message = error.message.to_s.strip.gsub(/\s*\n\s*/, " ")
        message = "#{message[0, 500]}..." if message.size > 500 && !@trace
        # undefined table or function: the schema is missing or old
        if error.respond_to?(:sqlstate) && %w[42P01 42883].include?(error.sqlstate)
          message = "#{message.chomp('.')} (is the database migrated? run `tasker db:migrate`)"
        end
        err.puts "tasker #{name}: #{prefix}#{message}"
        err.puts error.full_message(highlight: false) if @trace
        EXIT_FAILURE
      end

      # Times become ISO 8601 strings (UTC, milliseconds).
      def print_json(value)
        out.puts JSON.pretty_generate(json_ready(value))
      end

      def json_ready(value)
        case value
        when Hash then value.to_h { |k, v| [k, json_ready(v)] }
        when Array then value.map { |v| json_ready(v) }
        when Time then TaskerCore.iso8601(value)
        else value
        end
      end

      def stamp(time) = TaskerCore.iso8601(time)

      # "7d", "12h", "30m", "45s" -> seconds; a usage error otherwise.
      def duration_arg(value, option)
        Config.duration_seconds(value)
      rescue ArgumentError => e
        raise UsageError, "#{option}: #{e.message}"
      end
    end
  end
end
