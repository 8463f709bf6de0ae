# frozen_string_literal: true

require "open3"
require "rbconfig"

# The rspec kit in a separate rspec process, as an app's suite uses it:
# it refuses to empty a database that is not a test database, and leaves
# no files behind.
RSpec.describe "tasker_core/rspec safeguards" do
  LIB = File.expand_path("../../lib", __dir__)

  around do |example|
    @tmp = Dir.mktmpdir("kit_safety")
    File.chmod(0o755, @tmp)
    example.run
  ensure
    FileUtils.rm_rf(@tmp)
  end

  # A spec file using the kit, run by another rspec process with env.
  def run_kit_spec(env, body)
    File.write(File.join(@tmp, "tasker-config.yml"), "default:\n  logging:\n    level: warn\n")
    File.write(File.join(@tmp, "handlers.rb"), <<~RUBY)
      class SafetyEcho
        def call(task, _sequence, _step) = { "echo" => task.context["n"] }
      end
    RUBY
    File.write(File.join(@tmp, "app_spec.rb"), <<~RUBY)
      require "tasker_core/rspec"
      require_relative "handlers"
      TaskerCore::RSpec::Stack.handler_paths = [File.join(__dir__, "handlers.rb")]
      TaskerCore::RSpec::Stack.worker_concurrency = 2
      RSpec.describe "an app's workflow" do
        before do
          registry = TaskerCore::TaskTemplateRegistry.new
          registry.register(TaskerCore::TaskTemplate.new({ "name" => "echo", "steps" => [{ "name" => "a", "handler" => "SafetyEcho" }] }))
          TaskerCore.task_templates = registry
        end
        #{body}
      end
    RUBY
    rspec = Gem.bin_path("rspec-core", "rspec")
    Open3.capture2e({ "TASKER_CONFIG_PATH" => File.join(@tmp, "tasker-config.yml"), "TMPDIR" => @tmp }.merge(env),
                    RbConfig.ruby, "-I", LIB, rspec, File.join(@tmp, "app_spec.rb"), chdir: @tmp)
  end

  def database_url(name) = db_url.sub(%r{/[^/?]+(\?|\z)}, "/#{name}\\1")

  it "refuses a development database and leaves its rows alone; the opt-in variable overrides it" do
    name = "tasker_dev_#{Process.pid}"
    admin = connect
    admin.exec("DROP DATABASE IF EXISTS #{name}")
    admin.exec("CREATE DATABASE #{name}")
    dev_url = database_url(name)
    TaskerCore::Store.migrate!(dev_url)
    dev = connect(dev_url)
    TaskerCore::Store.pool = TaskerCore::Store::Pool.new(url: dev_url, size: 1)
    use_templates(template("keep", [step("a", handler: "SafetyEcho")]))
    3.times { |i| TaskerCore.create_task(name: "keep", context: { "n" => i }) }
    TaskerCore::Store.pool = nil
    count = -> { dev.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"] }
    expect(count.call).to eq(3)

    out, status = run_kit_spec({ "DATABASE_URL" => dev_url }, <<~RUBY)
      it "runs inline", :tasker_inline do
        expect(tasker_inline.run(name: "echo", context: { "n" => 1 }).status).to eq("complete")
      end
    RUBY
    expect(status).not_to be_success
    expect(out).to include("TaskerCore::UnsafeDatabaseError", %(refuses to use database "#{name}"),
                           "TASKER_RSPEC_ALLOW_ANY_DATABASE=1", "DATABASE_URL")
    expect(count.call).to eq(3)

    out, status = run_kit_spec({ "DATABASE_URL" => dev_url, "TASKER_RSPEC_ALLOW_ANY_DATABASE" => "1" }, <<~RUBY)
      it "runs inline", :tasker_inline do
        expect(tasker_inline.run(name: "echo", context: { "n" => 1 }).status).to eq("complete")
      end
    RUBY
    expect(status).to be_success, out
    expect(count.call).to eq(1) # emptied, as asked, then the example's own task
  ensure
    dev&.close
    admin&.exec("DROP DATABASE IF EXISTS #{name}") if admin && name
  end

  it "runs a :tasker_stack example on a test database and leaves no files behind" do
    out, status = run_kit_spec({ "DATABASE_URL" => db_url }, <<~RUBY)
      it "completes through the worker", :tasker_stack do
        id = TaskerCore.create_task(name: "echo", context: { "n" => 7 })
        expect(id).to complete_within(30)
        expect(id).to have_step("a").with_output("echo" => 7)
      end
    RUBY
    expect(status).to be_success, out
    expect(Dir.children(@tmp).sort).to eq(%w[app_spec.rb handlers.rb tasker-config.yml])
  end
end
