# frozen_string_literal: true

require_relative "cli_helpers"

RSpec.describe "tasker (help, usage errors, configuration)" do
  include CLIHelpers

  commands = ["orchestrator", "worker", "db:migrate", "task create", "task list", "task show", "task cancel",
              "step retry", "step resolve", "status", "workers", "cleanup", "demo"].freeze

  it "lists every command with --help, on stdout, exit 0" do
    r = tasker("--help")
    expect(r.exitstatus).to eq(0)
    commands.each { |c| expect(r.out).to include("  #{c} ") }
    expect(r.err).to be_empty
  end

  it "gives each command a --help with its usage and the common options" do
    commands.each do |c|
      r = tasker(*c.split, "--help")
      expect(r.exitstatus).to eq(0), "#{c}: #{r.err}"
      expect(r.out).to start_with("Usage: tasker #{c}")
      expect(r.out).to include("--config PATH", "--env ENV", "--trace")
    end
  end

  it "exits 2 with a pointer to --help for an unknown command, a missing subcommand, a bad option or argument" do
    cases = {
      %w[frobnicate] => /unknown command `frobnicate`/,
      %w[task] => /needs a subcommand/,
      %w[task explode] => /unknown command `tasker task explode`/,
      %w[status --bogus] => /invalid option: --bogus/,
      %w[task show] => /missing ID/,
      %w[task show 1 2] => /unexpected argument "2"/,
      %w[task show abc] => /ID must be a positive integer/,
      %w[worker] => /--handlers PATH is required/,
      %w[demo --tasks zero] => /--tasks must be a positive integer/,
      %w[step resolve 3] => /--output JSON is required/
    }
    cases.each do |args, message|
      r = tasker(*args)
      expect(r.exitstatus).to eq(2), "#{args.join(' ')}: #{r.err}"
      expect(r.err).to match(message)
      expect(r.err).to include("--help")
      expect(r.out).to be_empty
    end
  end

  it "prints the usage on stderr and exits 2 when given no command" do
    r = tasker
    expect(r.exitstatus).to eq(2)
    expect(r.err).to start_with("Usage: tasker COMMAND")
    expect(r.out).to be_empty
  end

  it "prints the version with --version and -v" do
    %w[--version -v].each do |flag|
      r = tasker(flag)
      expect([r.exitstatus, r.out]).to eq([0, "tasker #{TaskerCore::VERSION}\n"])
    end
  end

  it "refuses an --env the configuration file does not name, exit 2, and suggests the near one" do
    r = tasker("--env", "prodction", "status")
    expect(r.exitstatus).to eq(2)
    expect(r.err).to include('tasker status: unknown environment "prodction"', "development, test, production",
                             '(did you mean "production"?)')
    r = tasker("status", "--env", "production")
    expect(r.err).to include("no database is configured")
  end

  it "fails in one sentence, exit 1, when no database is configured" do
    %w[status db:migrate].each do |cmd|
      r = tasker(cmd)
      expect(r.exitstatus).to eq(1)
      expect(r.err_lines).to eq(["tasker #{cmd}: no database is configured: set DATABASE_URL (or database.url in " \
                                 "the configuration file) and run `tasker db:migrate`"])
    end
  end

  it "reads --config and --env, before or after the command, and reports a bad file in one line" do
    Dir.mktmpdir do |dir|
      path = File.join(dir, "tasker.yml")
      File.write(path, "default:\n  database:\n    url: postgresql://nobody@127.0.0.1:1/none\n" \
                       "staging:\n  database:\n    connect_timeout_s: 1\n")
      r = tasker("--config", path, "--env", "staging", "status")
      expect(r.exitstatus).to eq(1)
      expect(r.err_lines.size).to eq(1)
      expect(r.err).to match(/\Atasker status: .*127\.0\.0\.1/)
      expect(r.err).not_to include("no database is configured")

      File.write(path, "default:\n  database:\n    pool: zero\n")
      r = tasker("status", "--config", path)
      expect(r.exitstatus).to eq(1)
      expect(r.err_lines.size).to eq(1)
      expect(r.err).to include("database.pool")
    end
  end

  it "prints a backtrace only with --trace or TASKER_TRACE=1" do
    r = tasker("task", "create", "x", "--context", "[1]", "--trace", env: { "DATABASE_URL" => "postgresql://x@127.0.0.1:1/x" })
    expect(r.exitstatus).to eq(1)
    expect(r.err).to include("--context must be a JSON object", "cli/command.rb")
    r = tasker("task", "create", "x", "--context", "[1]", env: { "DATABASE_URL" => "postgresql://x@127.0.0.1:1/x" })
    expect(r.err_lines).to eq(["tasker task create: --context must be a JSON object, got array"])
  end
end
