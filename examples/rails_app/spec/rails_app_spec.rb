# frozen_string_literal: true

require_relative "spec_helper"
require "net/http"
require "json"

# The example app end to end: `rails server` takes POST /orders and creates
# a task (TaskerCore.create_task in the controller); `bin/tasker orchestrator`
# runs the loop and `bin/tasker worker --handlers app/handlers` runs the
# app's handlers in the Rails environment, until GET /orders/:id says complete.
RSpec.describe "examples/rails_app" do
  include RailsAppHelpers

  ORDER = { order_id: 42, customer_email: "ada@example.com",
            items: [{ sku: "TEA-1", quantity: 2, unit_price_cents: 450 },
                    { sku: "MUG-3", quantity: 1, unit_price_cents: 1200 }] }.freeze

  before(:all) do
    @tmp = Dir.mktmpdir("rails_app_spec")
    File.chmod(0o755, @tmp)
    @pg_dir = nil
    @database_url = ENV["DATABASE_URL"].to_s
    if @database_url.empty?
      @pg_dir = File.join(@tmp, "pg")
      @database_url = TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "rails_app_test")
    end
    @env = { "DATABASE_URL" => @database_url,
             "TASKER_BATCH_ENDPOINT" => "tcp://127.0.0.1:#{free_port}",
             "TASKER_RESULT_ENDPOINT" => "tcp://127.0.0.1:#{free_port}" }
  end

  after(:all) do
    stop_all
    reap_all
    TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir) if @pg_dir
    FileUtils.rm_rf(@tmp)
  end

  def log(name) = File.join(@tmp, "#{name}.log")

  def wait_for_log(name, pattern, timeout: 60)
    wait_until(timeout: timeout, message: "#{pattern.inspect} in #{name}'s output:\n#{File.read(log(name)) rescue ''}") do
      File.exist?(log(name)) && File.read(log(name)).match?(pattern)
    end
  end

  def http(port) = Net::HTTP.new("127.0.0.1", port).tap { |h| h.read_timeout = 30 }

  def post_order(port, order)
    res = http(port).post("/orders", JSON.generate(order: order), "Content-Type" => "application/json")
    [res.code.to_i, JSON.parse(res.body)]
  end

  def get_order(port, id)
    res = http(port).get("/orders/#{id}")
    [res.code.to_i, res.body.empty? ? nil : JSON.parse(res.body)]
  end

  it "creates a task from POST /orders and a worker process completes it with the app's handlers" do
    out, status = run_app(@env, "bin/tasker", "db:migrate")
    expect(status).to be_success, out

    orchestrator = spawn_app(@env, "bin/tasker", "orchestrator", "--stats-interval", "0", log: log("orchestrator"))
    spawn_app(@env, "bin/tasker", "worker", "--handlers", "app/handlers", "--concurrency", "2", log: log("worker"))
    port = free_port
    spawn_app(@env, "bin/rails", "server", "-b", "127.0.0.1", "-p", port.to_s, "--pid", File.join(@tmp, "server.pid"),
              log: log("server"))
    wait_until(timeout: 60, message: "rails server on #{port}:\n#{File.read(log('server')) rescue ''}") do
      TCPSocket.new("127.0.0.1", port).close || true
    rescue SystemCallError
      false
    end

    code, body = post_order(port, ORDER)
    expect(code).to eq(201), body.inspect
    task_id = body.fetch("task_id")
    expect(post_order(port, ORDER)).to eq([201, { "task_id" => task_id }]) # identity_key: the same order, the same task

    task = wait_until(timeout: 60, message: "task #{task_id} to finish:\n#{File.read(log('worker'))}\n#{File.read(log('orchestrator'))}") do
      _, t = get_order(port, task_id)
      t if t && %w[complete error cancelled].include?(t["status"])
    end
    steps = task["steps"].to_h { |s| [s["name"], s] }
    expect(task["status"]).to eq("complete"), JSON.pretty_generate(task)
    expect(steps.values.map { |s| s["state"] }.uniq).to eq(["complete"])
    expect(steps["price_order"]["output"]).to eq("total_cents" => 2100, "item_count" => 3)
    expect(steps["reserve_stock"]["output"]).to include("warehouse" => "AMS-1", "skus" => %w[TEA-1 MUG-3])
    expect(steps["charge_card"]["output"]).to include("amount_cents" => 2100, "currency" => "EUR")
    expect(steps["ship_order"]["output"]).to eq("tracking" => "TRK-42", "reservation_id" => "res-42",
                                                "charge_id" => steps["charge_card"]["output"]["charge_id"])

    code, body = post_order(port, ORDER.merge(items: []))
    expect(code).to eq(422)
    expect(body["error"]).to match(/items/)
    expect(get_order(port, 999_999).first).to eq(404)

    # TERM stops the orchestrator cleanly: exit status 0.
    Process.kill(:TERM, orchestrator)
    _, status = Process.wait2(orchestrator)
    RailsAppHelpers::PIDS.delete(orchestrator)
    expect(status.exitstatus).to eq(0), File.read(log("orchestrator"))
    stop_all(:TERM)
    reap_all
  end

  # A copy of the app without the files the generator writes; its bundle
  # points at the gem by absolute path (the copy lives elsewhere).
  def scratch_app(name, active_record: false)
    app = File.join(@tmp, name)
    FileUtils.mkdir_p(app)
    %w[Gemfile Gemfile.lock Rakefile config.ru app bin config].each { |f| FileUtils.cp_r(File.join(RailsAppHelpers::APP_ROOT, f), app) }
    edits = { "Gemfile" => ['path: "../.."', %(path: "#{RailsAppHelpers::GEM_ROOT}")],
              "Gemfile.lock" => ["remote: ../..", "remote: #{RailsAppHelpers::GEM_ROOT}"] }
    edits["config/application.rb"] = [/^require "action_controller\/railtie"/, %(require "active_record/railtie"\n\\0)] if active_record
    edits.each { |f, (from, to)| File.write(File.join(app, f), File.read(File.join(app, f)).sub(from, to)) }
    FileUtils.rm_rf(%w[config/tasker-config.yml config/tasks app/handlers bin/tasker].map { |f| File.join(app, f) })
    app
  end

  def generate_install(app)
    out, status = run_app(@env, "bin/rails", "generate", "tasker_core:install", chdir: app)
    expect(status).to be_success, out
    written = %w[config/tasker-config.yml config/tasks/example_task.yml app/handlers/example_handler.rb bin/tasker]
    written.each { |f| expect(out).to match(%r{create\s+#{Regexp.escape(f)}}) }
    expect(written.reject { |f| File.file?(File.join(app, f)) }).to eq([])
    expect(File.executable?(File.join(app, "bin/tasker"))).to be(true)
    out
  end

  it "rails generate tasker_core:install writes a config, a template, a handler and bin/tasker that the Railtie loads" do
    app = scratch_app("generated_app")
    out = generate_install(app)
    expect(out).to include("bin/tasker db:migrate") # no ActiveRecord here: no Rails migration, the binstub instead
    expect(Dir[File.join(app, "db/migrate/*")]).to eq([])
    expect(File.read(File.join(app, "config/tasker-config.yml"))).to include("e.g. rails_app")

    # The Railtie reads the generated config and template, and Zeitwerk autoloads the generated handler.
    script = <<~RUBY
      t = TaskerCore.task_templates.find(name: "example_task", namespace: "default")
      handler = Object.const_get(t.steps.first.handler)
      puts [TaskerCore.config.path, t.steps.map(&:name).join(","), handler.name,
            Object.const_source_location(handler.name).first].join("|")
    RUBY
    out, status = run_app(@env, "bin/rails", "runner", script, chdir: app)
    expect(status).to be_success, out
    path, steps, handler, source = out.lines.last.chomp.split("|")
    expect(path).to eq(File.join(File.realpath(app), "config/tasker-config.yml"))
    expect(steps).to eq("greet,shout")
    expect(handler).to eq("ExampleHandler")
    expect(source).to eq(File.join(File.realpath(app), "app/handlers/example_handler.rb"))

    out, status = run_app(@env, "bin/tasker", "--help", chdir: app)
    expect(status).to be_success, out
    expect(out).to include("orchestrator", "worker", "db:migrate")
  end

  it "in an app with ActiveRecord, the generator also writes a Rails migration that applies tasker_core's schema" do
    app = scratch_app("generated_ar_app", active_record: true)
    generate_install(app)
    migrations = Dir[File.join(app, "db/migrate/*_install_tasker_core.rb")]
    expect(migrations.size).to eq(1)
    expect(File.read(migrations.first)).to include("class InstallTaskerCore < ActiveRecord::Migration[7.0]")

    # Its #up is TaskerCore::Store.migrate! through the gem's own connection. Outside `rails runner`,
    # whose ActiveRecord would connect with the pg gem, which this bundle does not have.
    script = <<~RUBY
      require "active_record"
      require "tasker_core"
      require #{migrations.first.dump}
      InstallTaskerCore.new.up
      n = TaskerCore::Store.with_connection { |c| c.exec("SELECT count(*) AS n FROM tasker_schema_migrations").first["n"] }
      puts "migrations=\#{n}"
    RUBY
    out, status = run_app(@env, RbConfig.ruby, "-rbundler/setup", "-e", script, chdir: app)
    expect(status).to be_success, out
    expect(out[/migrations=(\d+)/, 1].to_i).to be_positive
  end
end
