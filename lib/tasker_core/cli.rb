# frozen_string_literal: true

require "optparse"
require "json"

module TaskerCore
  # The `tasker` command line (exe/tasker). One class per command, in
  # lib/tasker_core/cli/; each parses its own options (plus the common
  # --config, --env, --trace, --help) and returns an exit status:
  #   0   ok
  #   1   failure (the reason on stderr, in one sentence)
  #   2   usage error (bad option or argument)
  #   130 interrupted by SIGINT (work that stops half-way, such as `tasker demo`)
  # Long-running servers (orchestrator, worker) stop cleanly on TERM/INT and exit 0.
  #
  #   TaskerCore::CLI.start(ARGV) -> Integer
  class CLI
    EXIT_OK = 0
    EXIT_FAILURE = 1
    EXIT_USAGE = 2
    EXIT_INTERRUPTED = 130

    # Wrong arguments or options: exit 2 with a pointer to --help.
    class UsageError < StandardError; end

    # name => [file under cli/, class name]; loaded on use so `tasker --help`
    # and a bad command name need no database and no extension.
    COMMANDS = {
      "orchestrator" => %w[orchestrator Orchestrator],
      "worker" => %w[worker Worker],
      "db:migrate" => %w[db_migrate DbMigrate],
      "task create" => %w[task_create TaskCreate],
      "task list" => %w[task_list TaskList],
      "task show" => %w[task_show TaskShow],
      "task cancel" => %w[task_cancel TaskCancel],
      "step retry" => %w[step_retry StepRetry],
      "step resolve" => %w[step_resolve StepResolve],
      "status" => %w[status Status],
      "workers" => %w[workers Workers],
      "cleanup" => %w[cleanup Cleanup],
      "demo" => %w[demo Demo],
      "web" => %w[web Web],
      "keygen" => %w[keygen Keygen]
    }.freeze
    GROUPS = COMMANDS.keys.filter_map { |k| k.split(" ", 2).first if k.include?(" ") }.uniq.freeze

    SUMMARIES = {
      "orchestrator" => "run the orchestration loop in the foreground (TERM/INT stop it)",
      "worker" => "run a worker process that executes step handlers",
      "db:migrate" => "create or update the database schema",
      "task create" => "create a task from a task template",
      "task list" => "list tasks, newest first, filtered by state, name, namespace or age",
      "task show" => "show a task and its steps",
      "task cancel" => "cancel an unfinished task",
      "step retry" => "retry a step that is in error",
      "step resolve" => "mark a step as done by hand, with its output",
      "status" => "tasks by state, throughput and live workers",
      "workers" => "the workers the orchestrators know: capacity, in flight, heartbeat age, connections",
      "cleanup" => "delete finished tasks older than a duration, with their steps and histories",
      "demo" => "run an order-fulfilment workflow end to end and report its figures",
      "web" => "serve the dashboard (tasks, steps, workers, /metrics) over HTTP",
      "keygen" => "write a CurveZMQ key pair (PREFIX.key, PREFIX.pub; mode 0600)"
    }.freeze

    def self.start(argv, out: $stdout, err: $stderr)
      new(out: out, err: err).run(argv.dup)
    end

    def initialize(out:, err:)
      @out = out
      @err = err
    end

    def run(argv)
      trace = ENV["TASKER_TRACE"] == "1" || argv.include?("--trace")
      name, rest = resolve(argv)
      return help(@out) && EXIT_OK if name == :help
      return help(@err) && EXIT_USAGE if name == :usage
      return EXIT_OK if name == :version && @out.puts("tasker #{TaskerCore::VERSION}").nil?

      command_class(name).new(name: name, out: @out, err: @err, trace: trace).run(rest)
    rescue UsageError => e
      @err.puts "tasker: #{e.message}"
      @err.puts "Run `tasker --help` for the commands."
      EXIT_USAGE
    rescue LoadError => e
      @err.puts "tasker: #{e.message.lines.first.strip}"
      EXIT_FAILURE
    end

    private

    # [command name, remaining argv]; the common options may come before the
    # command name (`tasker --env test status`): they are passed on.
    def resolve(argv)
      leading = []
      while argv.first&.start_with?("-") && !%w[-h --help --version -v].include?(argv.first)
        opt = argv.shift
        leading << opt
        leading << argv.shift if %w[--config --env].include?(opt) && argv.any?
      end
      word = argv.shift
      return [:usage, []] if word.nil?
      return [:help, []] if %w[-h --help help].include?(word)
      return [:version, []] if %w[--version -v].include?(word)

      if GROUPS.include?(word)
        sub = argv.first
        if sub.nil? || sub.start_with?("-")
          asked = %w[-h --help].include?(sub)
          help_group(word, asked ? @out : @err)
          raise UsageError, "`tasker #{word}` needs a subcommand" unless asked

          return [:help_done, []]
        end
        argv.shift
        name = "#{word} #{sub}"
        raise UsageError, "unknown command `tasker #{name}`#{suggest(name)}" unless COMMANDS.key?(name)

        return [name, leading + argv]
      end
      raise UsageError, "unknown command `#{word}`#{suggest(word)}" unless COMMANDS.key?(word)

      [word, leading + argv]
    end

    def command_class(name)
      return HelpDone if name == :help_done

      file, klass = COMMANDS.fetch(name)
      require_relative "cli/#{file}"
      CLI.const_get(klass)
    end

    def suggest(word)
      guess = DidYouMean::SpellChecker.new(dictionary: COMMANDS.keys + GROUPS).correct(word).first
      guess ? " (did you mean `#{guess}`?)" : ""
    rescue NameError
      ""
    end

    def help(io)
      io.puts "Usage: tasker COMMAND [options]"
      io.puts
      io.puts "Commands:"
      width = COMMANDS.keys.map(&:size).max
      COMMANDS.each_key { |k| io.puts "  #{k.ljust(width)}  #{SUMMARIES[k]}" }
      io.puts
      io.puts "Options every command takes:"
      io.puts "  --config PATH  configuration file (default config/tasker-config.yml, TASKER_CONFIG_PATH)"
      io.puts "  --env ENV      configuration environment (default TASKER_ENV, RAILS_ENV, RACK_ENV, development)"
      io.puts "  --trace        print backtraces with errors (also TASKER_TRACE=1)"
      io.puts "  -h, --help     help for the command"
      io.puts
      io.puts "tasker -v, --version prints the version. Times are ISO 8601 in UTC with milliseconds."
      io.puts
      io.puts "The database is DATABASE_URL, else database.url from the configuration."
      true
    end

    def help_group(group, io)
      io.puts "Usage: tasker #{group} SUBCOMMAND [options]"
      io.puts
      COMMANDS.each_key.select { |k| k.start_with?("#{group} ") }.each { |k| io.puts "  #{k.ljust(14)}  #{SUMMARIES[k]}" }
    end

    # `tasker task --help` printed the group's help already.
    class HelpDone
      def initialize(**) = nil
      def run(_argv) = EXIT_OK
    end
  end
end

require_relative "cli/command"
require_relative "cli/rails_app"
