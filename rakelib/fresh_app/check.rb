# frozen_string_literal: true

require "bundler"
require "fileutils"
require "json"
require "open3"
require "rbconfig"
require "socket"
require "timeout"
require_relative "../built_gem"

# rake rails:fresh_app: what a new Rails team does with tasker_core, from the
# built gem. Builds the .gem, installs it into an empty GEM_HOME (its
# dependencies from the gems already on the machine), creates an app with
# `rails new --database=postgresql` whose config/database.yml points at a
# private PostgreSQL (no DATABASE_URL anywhere), adds the gem by version,
# then: the install generator, db:migrate, db:test:prepare, db:schema:load,
# db:prepare, rspec (maintain_test_schema! on an empty test database, and
# :tasker_stack with a handler using a model), the rspec kit refusing the
# development database, and a task through `bin/tasker orchestrator` and
# `bin/tasker worker` processes (a handler using a model at a concurrency
# above the pool size; a task created in a rolled-back transaction).
#
# Everything lives in tmp/fresh_app; it is removed when the check passes and
# kept for a look when it fails.
class FreshAppCheck
  RAILS = "7.0.8.7"
  FILES = File.join(__dir__, "files")
  # The gems the app's Gemfile resolves to (besides tasker_core), installed
  # with `gem install` when missing; Bundler then resolves locally.
  LOCK = File.join(__dir__, "gems.lock")
  RAILS_NEW_FLAGS = %w[--database=postgresql --minimal --skip-bundle --skip-git --skip-test --skip-system-test
                       --skip-asset-pipeline --skip-bootsnap --skip-jbuilder --skip-javascript --skip-hotwire].freeze

  class Failure < StandardError; end

  def initialize(root:, dir: File.join(root, "tmp", "fresh_app"), out: $stdout)
    @root = root
    @dir = dir
    @out = out
    @pids = []
  end

  def run
    started = now
    FileUtils.rm_rf(@dir)
    FileUtils.mkdir_p([@dir, tmpdir])
    step("gems") { install_missing_gems }
    step("PostgreSQL") { start_postgres }
    step("gem build + install into an empty GEM_HOME") { build_and_install_gem }
    step("rails new") { rails_new }
    step("bin/rails generate tasker_core:install") { generate }
    step("db:create db:migrate (db/structure.sql)") { migrate }
    step("db:test:prepare, db:schema:load, db:prepare") { prepare_databases }
    step("rspec: maintain_test_schema! on an empty test database, :tasker_stack") { rspec }
    step("rspec kit refuses the development database") { rspec_refuses_development_database }
    step("bin/tasker orchestrator + bin/tasker worker") { run_processes }
    say format("rails:fresh_app passed in %.0f s", now - started)
    FileUtils.rm_rf(@dir)
  rescue StandardError => e
    detail = e.is_a?(Failure) ? e.message : "#{e.class}: #{e.message}\n#{e.backtrace.first(8).join("\n")}"
    raise Failure, "#{detail}\n(the app and its logs are kept in #{@dir})"
  ensure
    stop_processes
    stop_postgres
  end

  private

  def app = File.join(@dir, "app")
  def gem_home = File.join(@dir, "home")
  # the app's commands' temporary files: the rspec kit must leave none
  def tmpdir = File.join(@dir, "tmpdir")
  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  def say(msg) = @out.puts("fresh_app: #{msg}")

  def step(name)
    t = now
    yield
    say format("%-72s %5.1f s", name, now - t)
  end

  def check(ok, message)
    raise Failure, message unless ok
  end

  # The environment of every command in the app: its own bundle, the
  # installed gem from GEM_HOME, and nothing of the checkout's (no
  # DATABASE_URL, no tasker_core settings, no RUBYOPT=-rbundler/setup).
  def app_env(extra = {})
    BuiltGem.env(gem_home).merge(
      "BUNDLE_GEMFILE" => File.join(app, "Gemfile"), "BUNDLE_FROZEN" => nil, "BUNDLE_PATH" => nil,
      "DATABASE_URL" => nil, "TASKER_CONFIG_PATH" => nil, "TASKER_ENV" => nil, "RAILS_ENV" => nil,
      "RACK_ENV" => nil, "TASKER_RSPEC_ALLOW_ANY_DATABASE" => nil, "RUBYOPT" => nil, "RUBYLIB" => nil,
      "TMPDIR" => tmpdir
    ).merge(extra)
  end

  # Runs cmd in the app (or chdir); returns its output; raises with the
  # output's tail when it fails (or succeeds when it should not).
  def sh(*cmd, env: {}, chdir: app, expect_success: true, timeout: 300)
    log = File.join(@dir, "commands.log")
    out = +""
    status = nil
    Bundler.with_unbundled_env do
      Open3.popen2e(app_env(env), *cmd, chdir: chdir, pgroup: true) do |stdin, stdout, wait|
        stdin.close
        begin
          Timeout.timeout(timeout) { out << stdout.read }
        rescue Timeout::Error
          Process.kill("-KILL", wait.pid)
          raise Failure, "`#{cmd.join(' ')}` did not finish in #{timeout} s:\n#{out[-3000..] || out}"
        end
        status = wait.value
      end
    end
    File.open(log, "a") { |f| f.puts("$ #{cmd.join(' ')}  (exit #{status.exitstatus})", out, "") }
    if status.success? != expect_success
      raise Failure, "`#{cmd.join(' ')}` #{status.success? ? 'succeeded but should have failed' : "failed (exit #{status.exitstatus})"}:\n#{out[-4000..] || out}"
    end

    out
  end

  def install_missing_gems
    lock = Bundler::LockfileParser.new(File.read(LOCK))
    wanted = lock.specs.map { |s| "#{s.name} #{s.version}\n" }.join
    # Asked of a plain `ruby` (under `bundle exec` only the checkout's bundle is visible).
    script = 'STDIN.each_line { |l| n, v = l.split; puts l if Gem::Specification.find_all_by_name(n, "= #{v}").empty? }'
    missing, status = Bundler.with_unbundled_env { Open3.capture2(RbConfig.ruby, "-e", script, stdin_data: wanted) }
    check(status.success?, "could not list the installed gems")
    # Exactly the locked versions, no newer dependency, into the machine's
    # gem directory (kept for the next run); executables into a folder of
    # the check's own (rack 2's `rackup` would clash with rackup's).
    missing.lines.map(&:split).each do |name, version|
      sh("gem", "install", "--no-document", "--ignore-dependencies", "--bindir", File.join(@dir, "gem-bin"),
         name, "-v", version, env: { "GEM_HOME" => nil, "GEM_PATH" => nil }, chdir: @dir)
    end
  end

  def start_postgres
    @pg_dir = File.join(@dir, "postgres")
    url = TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "postgres")
    @pg_port = Integer(url[/:(\d+)\//, 1])
  end

  def stop_postgres
    TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir) if @pg_dir
  rescue StandardError => e
    say "could not stop PostgreSQL in #{@pg_dir}: #{e.message}"
  end

  def build_and_install_gem
    BuiltGem.build_and_install(dir: @dir, gem_home: gem_home,
                               run: ->(env, *cmd, chdir:) { sh(*cmd, env: env, chdir: chdir) })
  rescue BuiltGem::Failure => e
    raise Failure, e.message
  end

  def rails_new
    sh(RbConfig.ruby, "-e", %(gem "concurrent-ruby", "1.3.4"; gem "railties", "#{RAILS}"; ) +
                            %(load Gem.bin_path("railties", "rails", "#{RAILS}")),
       "--", "new", "app", *RAILS_NEW_FLAGS, chdir: @dir)
    gemfile = File.join(app, "Gemfile")
    # No gem server named (the machine's `gem` configuration installed the
    # gems); pg at the version installed; the gem by version, not by path.
    text = File.read(gemfile).lines.reject { |l| l.start_with?("source ", "git_source") }.join
    text = text.sub(/^gem "pg".*$/, %(gem "pg", "#{lock_version('pg')}"))
    text << <<~GEMFILE

      # Rails 7.0 on this machine: concurrent-ruby before 1.3.5 (Rails 7.0 relies on it loading
      # logger) and rails-html-sanitizer 1.5 (the nokogiri Debian ships).
      gem "concurrent-ruby", "#{lock_version('concurrent-ruby')}"
      gem "rails-html-sanitizer", "#{lock_version('rails-html-sanitizer')}"

      gem "tasker_core", "#{TaskerCore::VERSION}"

      group :development, :test do
        gem "rspec-rails", "#{lock_version('rspec-rails')}"
      end
    GEMFILE
    File.write(gemfile, text)
    sh("bundle", "lock", "--local")
    path = sh("bundle", "exec", "ruby", "-e", 'print Gem.loaded_specs.fetch("tasker_core").full_gem_path')
    check(path.strip.start_with?(gem_home), "the app should use the installed gem, uses #{path}")

    # The ordinary database.yml, pointed at the private PostgreSQL.
    yml = File.join(app, "config", "database.yml")
    text = File.read(yml)
    check(text.include?("default: &default\n"), "unexpected config/database.yml:\n#{text}")
    File.write(yml, text.sub("default: &default\n",
                             "default: &default\n  host: 127.0.0.1\n  port: #{@pg_port}\n  username: postgres\n"))
  end

  def lock_version(name)
    @lock ||= Bundler::LockfileParser.new(File.read(LOCK))
    @lock.specs.find { |s| s.name == name }.version.to_s
  end

  def generate
    out = sh("bin/rails", "generate", "tasker_core:install")
    check(!out.include?("Could not find"), "the generator could not find its templates:\n#{out}")
    %w[config/tasker-config.yml config/tasks/example_task.yml app/handlers/example_handler.rb bin/tasker].each do |f|
      check(File.file?(File.join(app, f)), "the generator did not write #{f}:\n#{out}")
    end
    check(File.executable?(File.join(app, "bin", "tasker")), "bin/tasker is not executable")
    check(Dir[File.join(app, "db", "migrate", "*_install_tasker_core.rb")].size == 1,
          "the generator did not write the install migration:\n#{out}")
    check(File.read(File.join(app, "config", "application.rb")).include?("config.active_record.schema_format = :sql"),
          "the generator did not set schema_format :sql:\n#{out}")

    # The app's own parts: a model, its migration, a handler using it, a
    # template, a spec; free ports for the orchestrator and the worker.
    FileUtils.cp_r("#{FILES}/.", app)
    config = File.join(app, "config", "tasker-config.yml")
    text = File.read(config)
    ports = Array.new(2) { free_port }
    text = text.sub("tcp://127.0.0.1:5555", "tcp://127.0.0.1:#{ports[0]}").sub("tcp://127.0.0.1:5556", "tcp://127.0.0.1:#{ports[1]}")
    File.write(config, text)
    sh("bin/rails", "generate", "rspec:install")
  end

  def free_port
    s = TCPServer.new("127.0.0.1", 0)
    s.addr[1]
  ensure
    s&.close
  end

  def migrate
    sh("bin/rails", "db:create", "db:migrate")
    structure = File.join(app, "db", "structure.sql")
    check(File.file?(structure), "db:migrate wrote no db/structure.sql")
    check(!File.exist?(File.join(app, "db", "schema.rb")), "db:migrate wrote db/schema.rb")
    sql = File.read(structure)
    check(sql.match?(/CREATE FUNCTION public\.tasker_claim_steps/), "db/structure.sql lacks tasker_core's functions")
    check(sql.include?("tasker_orchestrators_version"), "db/structure.sql lacks tasker_orchestrators_version")
    check(sql.include?("CREATE TABLE public.widgets"), "db/structure.sql lacks the app's widgets table")
    check(sql.include?("INSERT INTO tasker_schema_migrations"), "db/structure.sql lacks tasker_schema_migrations' rows")
  end

  # What a database loaded from db/structure.sql must have for tasker_core:
  # its tables, functions and sequences and the gem's migrations recorded.
  SCHEMA_PROBE = <<~RUBY
    c = ActiveRecord::Base.connection
    puts [c.select_value("SELECT current_database()"),
          c.select_value("SELECT count(*) FROM tasker_schema_migrations"),
          c.select_value("SELECT to_regproc('tasker_claim_steps') IS NOT NULL"),
          c.select_value("SELECT to_regclass('tasker_orchestrators_version') IS NOT NULL"),
          c.table_exists?(:widgets)].join(" ")
  RUBY

  def schema_ok(env)
    out = sh("bin/rails", "runner", SCHEMA_PROBE, env: { "RAILS_ENV" => env }).lines.last.to_s.split
    migrations = Dir[File.join(@root, "db", "migrate", "*.sql")].size
    check(out == ["app_#{env}", migrations.to_s, "true", "true", "true"],
          "the #{env} database lacks tasker_core's schema (database, gem migrations, function, sequence, " \
          "widgets): #{out.join(' ')}")
  end

  def prepare_databases
    sh("bin/rails", "db:test:prepare")
    schema_ok("test")
    # db:schema:load loads db/structure.sql into an empty database (as
    # db:setup and db:reset do; psql stops at the first table already there).
    sh("bin/rails", "db:drop", "db:create", "db:schema:load", env: { "RAILS_ENV" => "test" })
    schema_ok("test")
    # db:prepare on a database that does not exist: created and loaded from
    # db/structure.sql (in development it prepares the test database too).
    sh("bin/rails", "db:drop")
    sh("bin/rails", "db:prepare")
    schema_ok("development")
    schema_ok("test")
  end

  def rspec
    # An empty test database: maintain_test_schema! (rails_helper) loads it.
    sh("bin/rails", "db:drop", "db:create", env: { "RAILS_ENV" => "test" })
    out = sh("bundle", "exec", "rspec", "--format", "documentation", "spec/tasker_spec.rb")
    check(out.include?("1 example, 0 failures"), "rspec:\n#{out}")
    schema_ok("test")
    leftovers = Dir.children(tmpdir)
    check(leftovers.empty?, "the rspec kit left files behind in TMPDIR: #{leftovers.inspect}")
  end

  def rspec_refuses_development_database
    probe = "puts TaskerCore.create_task(name: 'example_task', context: { 'name' => 'kept' })"
    kept = sh("bin/rails", "runner", probe).lines.last.to_i
    url = "postgresql://postgres@127.0.0.1:#{@pg_port}/app_development"
    out = sh("bundle", "exec", "rspec", "spec/tasker_spec.rb", env: { "DATABASE_URL" => url }, expect_success: false)
    check(out.include?(%(refuses to use database "app_development")), "the rspec kit did not refuse app_development:\n#{out}")
    left = sh("bin/rails", "runner", "puts TaskerCore.task(#{kept})&.fetch(:id).inspect").lines.last.to_s.strip
    check(left == kept.to_s, "the development database lost task #{kept} (#{left})")
  end

  def run_processes
    logs = File.join(@dir, "logs")
    FileUtils.mkdir_p(logs)
    @orchestrator = spawn_in_app("orchestrator", logs)
    @worker = spawn_in_app("worker", logs)
    out = sh("bin/rails", "runner", "script/tasker_check.rb", timeout: 150)
    result = JSON.parse(out.lines.last)
    check(result["rolled_back_task"].nil? && result["rolled_back_widgets"].zero?,
          "a task created in a rolled-back transaction exists: #{result['rolled_back_task'].inspect}")
    check(result["status"] == "complete", "the task did not complete: #{JSON.pretty_generate(result)}")
    retried = result["steps"].reject { |s| s["state"] == "complete" && s["attempts"] == 1 && s["failures"].zero? }
    check(retried.empty?, "steps failed or were retried: #{JSON.pretty_generate(retried)}")
    check(result["widgets"] == 13, "13 widgets expected, #{result['widgets']}")
    worker_log = File.read(File.join(logs, "worker.log"))
    dev_log = File.read(File.join(app, "log", "development.log"))
    # ActiveRecord::ConnectionTimeoutError's message: none, though the
    # worker warned that its concurrency is above the pool size.
    check(!"#{worker_log}#{dev_log}".include?("could not obtain a connection from the pool"),
          "connection errors in the worker's logs (#{File.join(app, 'log', 'development.log')})")
    check(dev_log.match?(/pool for database "primary" holds 5 connections, fewer than this worker's concurrency of 10/),
          "the worker did not warn that the pool is smaller than its concurrency")
  end

  def spawn_in_app(command, logs)
    pid = Bundler.with_unbundled_env do
      Process.spawn(app_env, "bin/tasker", command, chdir: app, pgroup: true,
                                                     %i[out err] => [File.join(logs, "#{command}.log"), "w"])
    end
    @pids << pid
    pid
  end

  def stop_processes
    @pids.each do |pid|
      Process.kill("-TERM", pid)
    rescue Errno::ESRCH
      nil
    end
    @pids.each do |pid|
      Timeout.timeout(20) { Process.wait(pid) }
    rescue Timeout::Error
      Process.kill("-KILL", pid)
      Process.wait(pid)
    rescue Errno::ECHILD, Errno::ESRCH
      nil
    end
    @pids.clear
  end
end
