# frozen_string_literal: true

require_relative "spec_helper"
require "net/http"
require "json"

# The example app end to end: `rails server` takes POST /orders and creates
# a task (TaskerCore.create_task in the controller); `bin/tasker orchestrator`
# runs the loop and `tasker worker` (the gem's command, run in the app's
# directory: it boots the app) runs the app's handlers, one of them writing
# an ActiveRecord model, until GET /orders/:id says complete. The database is
# config/database.yml's only (libpq's PG* variables, no DATABASE_URL).
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
    server = URI(@database_url)
    # The server only: database.yml names the database of each environment.
    @env = { "DATABASE_URL" => nil, "PGHOST" => server.host, "PGPORT" => server.port.to_s,
             "PGUSER" => server.user && URI.decode_www_form_component(server.user),
             "PGPASSWORD" => server.password && URI.decode_www_form_component(server.password),
             "TASKER_BATCH_ENDPOINT" => "tcp://127.0.0.1:#{free_port}",
             "TASKER_RESULT_ENDPOINT" => "tcp://127.0.0.1:#{free_port}" }
    %w[db:create db:migrate].each do |task|
      out, status = run_app(@env, "bin/rails", task)
      raise "bin/rails #{task} failed:\n#{out}" unless status.success?
    end
    out, status = run_app(@env, "bin/tasker", "db:migrate")
    raise "bin/tasker db:migrate failed:\n#{out}" unless status.success?
    @db = TaskerCore::Store::Connection.new(@database_url.sub(%r{/[^/?]*(\?|\z)}, "/rails_app_test\\1"))
  end

  after(:all) do
    @db&.close
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

  # The app runs the installed gem (rake examples installs it into a GEM_HOME of its own), not this checkout:
  # its Ruby code and its compiled extension.
  it "loads tasker_core from the installed gem, not from the checkout" do
    gem_home = File.realpath(ENV.fetch("GEM_HOME", Gem.dir))
    script = 'puts [Gem.loaded_specs.fetch("tasker_core").full_gem_path, Object.const_source_location("TaskerCore::Orchestrator").first, ' \
             '$LOADED_FEATURES.grep(/tasker_core_ext/).first].map { |f| File.realpath(f) }.join("|")'
    out, status = run_app(@env, "bin/rails", "runner", script)
    expect(status).to be_success, out
    gem_dir, source, ext = out.lines.last.chomp.split("|")
    expect(gem_dir).to eq(File.join(gem_home, "gems", "tasker_core-#{TaskerCore::VERSION}"))
    expect([source, ext]).to all(start_with("#{gem_dir}/"))
    checkout_lib = File.join(File.realpath(RailsAppHelpers::GEM_ROOT), "lib/")
    expect([source, ext]).to all(satisfy { |f| !f.start_with?(checkout_lib) })
    expect(File.realpath(Object.const_source_location("TaskerCore").first)).to start_with("#{gem_dir}/") # this spec's process too
  end

  it "creates tasks from POST /orders and a worker above the pool size completes them with a model-writing handler" do
    spawn_tty(@env, "bin/tasker", "orchestrator", "--stats-interval", "0", log: log("orchestrator"))
    # ActiveRecord's pool holds 2 connections (RAILS_MAX_THREADS in database.yml), the worker runs 6 steps at once;
    # in a terminal (a pty here) it logs to stdout as well as to log/test.log.
    spawn_tty(@env.merge("RAILS_MAX_THREADS" => "2"), "bundle", "exec", "tasker", "worker", "--concurrency", "6",
              log: log("worker"))
    port = free_port
    spawn_app(@env, "bin/rails", "server", "-b", "127.0.0.1", "-p", port.to_s, "--pid", File.join(@tmp, "server.pid"),
              log: log("server"))
    wait_for_log("orchestrator", /tasker orchestrator: running/)
    wait_until(timeout: 60, message: "rails server on #{port}:\n#{File.read(log('server')) rescue ''}") do
      TCPSocket.new("127.0.0.1", port).close || true
    rescue SystemCallError
      false
    end

    code, body = post_order(port, ORDER)
    expect(code).to eq(201), body.inspect
    task_id = body.fetch("task_id")
    expect(post_order(port, ORDER)).to eq([201, { "task_id" => task_id }]) # identity_key: the same order, the same task

    task = wait_until(timeout: 60, message: "task #{task_id} to finish:\n#{File.read(log('worker'))}") do
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

    # Twelve more orders at once: reserve_stock steps of several orders run together on 6 threads
    # sharing 2 connections, each given back when its step ends (the Rails executor around each handler).
    ids = (1..12).map { |n| post_order(port, ORDER.merge(order_id: 100 + n)).last.fetch("task_id") }
    finished = ids.map do |id|
      wait_until(timeout: 90, message: "task #{id} to finish:\n#{File.read(log('worker'))}") do
        _, t = get_order(port, id)
        t if t && %w[complete error cancelled].include?(t["status"])
      end
    end
    expect(finished.map { |t| t["status"] }.uniq).to eq(["complete"]), finished.to_json
    retried = finished.flat_map { |t| t["steps"] }.reject { |s| s["attempts"] == 1 }
    expect(retried).to eq([]), retried.to_json
    expect(@db.exec("SELECT count(*) AS n FROM reservations").first["n"]).to be >= 13
    worker_log = File.read(log("worker"))
    expect(worker_log).to include(%(ActiveRecord's pool for database "primary" holds 2 connections, fewer than this worker's concurrency of 6))
    expect(worker_log.lines.grep(/ConnectionTimeoutError|could not obtain a connection/).grep_v(/Set pool:/)).to eq([])

    code, body = post_order(port, ORDER.merge(items: []))
    expect(code).to eq(422)
    expect(body["error"]).to match(/items/)
    expect(get_order(port, 999_999).first).to eq(404)

    stop_all(:TERM)
    reap_all
    expect(File.read(log("orchestrator"))).to match(/tasker orchestrator: stopped/)
  end

  it "runs ActiveJob jobs on tasker_core: queue, priority, wait, retry_on, discard_on, enqueue_all and an unhandled error" do
    spawn_tty(@env, "bin/tasker", "orchestrator", "--stats-interval", "0", log: log("aj_orchestrator"))
    spawn_tty(@env, "bundle", "exec", "tasker", "worker", "--concurrency", "4", "--queues", "default,receipts",
              log: log("aj_worker"))
    wait_for_log("aj_orchestrator", /tasker orchestrator: running/)

    script = <<~'RUBY'
      adapter = ActiveJob::Base.queue_adapter
      enqueued_at = Time.now
      ids = {
        plain: OrderReceiptJob.perform_later(201).provider_job_id,
        retried: OrderReceiptJob.perform_later(202, busy: 2).provider_job_id,
        discarded: OrderReceiptJob.perform_later(-1).provider_job_id,
        unhandled: OrderReceiptJob.perform_later(0).provider_job_id,
        later: OrderReceiptJob.set(wait: 3, priority: 7, queue: "receipts").perform_later(203).provider_job_id
      }
      all = [OrderReceiptJob.new(204), OrderReceiptJob.new(205)]
      puts "adapter=#{adapter.class.name} enqueue_all=#{adapter.enqueue_all(all)}"
      ids[:all] = all.map(&:provider_job_id)
      puts "ids=#{JSON.generate(ids)} enqueued_at=#{enqueued_at.to_f}"
      # Refusals are ActiveJob::EnqueueError (perform_later returns false): a queue name
      # tasker_core refuses, and the database refusing the INSERT in an aborted transaction.
      refused = OrderReceiptJob.new(206)
      puts "refused=#{[refused.enqueue(queue: "low priority"), refused.enqueue_error.class, refused.enqueue_error.cause.class].join("/")}"
      ActiveRecord::Base.transaction do
        begin
          ActiveRecord::Base.connection.execute("SELECT 1/0")
        rescue ActiveRecord::StatementInvalid
          nil # the transaction is aborted: PostgreSQL refuses every statement until the rollback
        end
        aborted = OrderReceiptJob.new(207)
        puts "aborted=#{[aborted.enqueue, aborted.enqueue_error.class, aborted.enqueue_error.cause.class].join("/")}"
        raise ActiveRecord::Rollback
      end
    RUBY
    out, status = run_app(@env, "bin/rails", "runner", script)
    expect(status).to be_success, out
    expect(out).to include("adapter=ActiveJob::QueueAdapters::TaskerCoreAdapter enqueue_all=2")
    expect(out).to include("refused=false/ActiveJob::EnqueueError/TaskerCore::ValidationError")
    expect(out).to include("aborted=false/ActiveJob::EnqueueError/PG::InFailedSqlTransaction")
    ids = JSON.parse(out[/^ids=(\S+)/, 1])
    enqueued_at = Time.at(Float(out[/enqueued_at=(\S+)/, 1]))
    task_ids = ids.values.flatten
    expect(task_ids).to all(be_a(Integer))

    state = ->(id) { @db.exec("SELECT state FROM tasker_tasks WHERE id = $1", [id]).first["state"] }
    wait_until(timeout: 60, message: "the jobs' tasks to finish:\n#{File.read(log('aj_worker')) rescue ''}") do
      task_ids.all? { |id| %w[complete error cancelled].include?(state.(id)) }
    end
    # ActiveJob re-enqueues the retried job twice, as new tasks; wait for the last one.
    wait_until(timeout: 60, message: "the retried job's receipt") { @db.exec("SELECT 1 FROM receipts WHERE order_id = 202").any? }

    receipts = @db.exec("SELECT order_id, executions, extract(epoch FROM created_at)::float8 AS at FROM receipts " \
                        "WHERE order_id BETWEEN 201 AND 205 ORDER BY order_id").to_a
    expect(receipts.map { |r| r.values_at("order_id", "executions") }).to eq([[201, 1], [202, 3], [203, 1], [204, 1], [205, 1]])
    expect(receipts.find { |r| r["order_id"] == 203 }["at"]).to be >= enqueued_at.to_f + 3 # wait: 3 (seconds)

    jobs = @db.exec(<<~SQL).to_a
      SELECT t.id, t.state, t.identity_key, s.queue, s.priority, s.attempts, s.last_error IS NOT NULL AS failed
        FROM tasker_tasks t JOIN tasker_workflow_steps s ON s.task_id = t.id
       WHERE t.namespace = 'active_job' AND t.name = 'perform'
    SQL
    by_id = jobs.to_h { |j| [j["id"], j] }
    expect(ids.except("unhandled").values.flatten.map { |id| by_id.fetch(id)["state"] }.uniq).to eq(["complete"]) # discard_on too
    expect(by_id.fetch(ids["unhandled"])).to include("state" => "error", "attempts" => 1, "failed" => true) # not retried by us
    expect(by_id.fetch(ids["later"])).to include("queue" => "receipts", "priority" => -7) # ActiveJob's 7 (lower first) is our -7
    expect(by_id.fetch(ids["plain"])).to include("queue" => "default", "priority" => 0)
    retried = jobs.select { |j| j["identity_key"].start_with?("active_job/OrderReceiptJob/") && j["state"] == "complete" }
                  .map { |j| j["identity_key"].split("/").last.to_i }
    expect(retried.tally.fetch(2)).to be >= 1 # the third execution (executions 0, 1, 2): two re-enqueues by retry_on

    out, status = run_app(@env, "bin/tasker", "status", "--json")
    expect(status).to be_success, out
    counts = JSON.parse(out[/^\{.*/m])["jobs"].to_h { |j| [[j["job_class"], j["state"]], j["count"]] }
    expect(counts[%w[OrderReceiptJob error]]).to eq(1)
    expect(counts[%w[OrderReceiptJob complete]]).to be >= 8 # 7 enqueued here, 2 of them retried, less the unhandled one

    stop_all(:TERM)
    reap_all
  end

  # A copy of the app without the files the generator writes; its Gemfile
  # reads the version from the checkout by absolute path (the copy lives elsewhere).
  def scratch_app(name, active_record: false)
    app = File.join(@tmp, name)
    FileUtils.mkdir_p(app)
    %w[Gemfile Gemfile.lock Rakefile config.ru app bin config].each { |f| FileUtils.cp_r(File.join(RailsAppHelpers::APP_ROOT, f), app) }
    version_rb = File.join(RailsAppHelpers::GEM_ROOT, "lib/tasker_core/version.rb")
    edits = { "Gemfile" => ['File.expand_path("../../lib/tasker_core/version.rb", __dir__)', version_rb.inspect] }
    unless active_record
      edits["config/application.rb"] = [%(require "active_record/railtie"\n), ""]
      edits["config/environments/test.rb"] = [/^.*\n.*dump_schema_after_migration.*\n/, ""]
    end
    edits.each { |f, (from, to)| File.write(File.join(app, f), File.read(File.join(app, f)).sub(from, to)) }
    FileUtils.rm_rf(%w[config/tasker-config.yml config/tasks app/handlers bin/tasker].map { |f| File.join(app, f) })
    FileUtils.rm_rf(%w[config/database.yml app/models].map { |f| File.join(app, f) }) unless active_record
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

    # `bin/rails db:migrate` runs it with the app's config/database.yml (TaskerCore::Store.migrate! on the
    # database ActiveRecord is configured for; tasker_core's schema is there already, so it adds nothing).
    out, status = run_app(@env, "bin/rails", "db:migrate", chdir: app)
    expect(status).to be_success, out
    version = File.basename(migrations.first).to_i
    script = 'puts "migrations=#{TaskerCore::Store.with_connection { |c| c.exec("SELECT count(*) AS n FROM tasker_schema_migrations").first["n"] }} " \
                  "db=#{ActiveRecord::Base.connection.current_database} " \
                  "install=#{ActiveRecord::Base.connection.select_value("SELECT count(*) FROM schema_migrations WHERE version = \'VERSION\'")}"'
    script = script.sub("VERSION", version.to_s)
    out, status = run_app(@env, "bin/rails", "runner", script, chdir: app)
    expect(status).to be_success, out
    expect(out).to include("db=rails_app_test", "install=1")
    expect(out[/migrations=(\d+)/, 1].to_i).to be_positive
  end

  it "creates a task inside an ActiveRecord transaction that commits or rolls back with it" do
    script = <<~'RUBY'
      order = { "order_id" => 501, "items" => [{ "sku" => "TEA-1", "quantity" => 1, "unit_price_cents" => 450 }],
                "note" => "\xFF\x00binary".b }
      rolled_back = nil
      ActiveRecord::Base.transaction do
        Reservation.create!(order_id: 501, warehouse: "AMS-1", skus: ["TEA-1"])
        rolled_back = TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: order)
        raise ActiveRecord::Rollback
      end
      committed = ActiveRecord::Base.transaction do
        TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: order.merge("order_id" => 502))
      end
      outside = TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: order.merge("order_id" => 503))
      task = TaskerCore.task(committed)
      puts "db=#{TaskerCore.config.database['url'][/dbname='([^']+)'/, 1]}"
      puts "rolled_back=#{TaskerCore.task(rolled_back).inspect} reservation=#{Reservation.exists?(order_id: 501)}"
      puts "committed=#{task[:status]} binary=#{task[:context]['note'] == "\xFF\x00binary".b} steps=#{task[:steps].size}"
      puts "outside=#{TaskerCore.task(outside)&.fetch(:status)}"
    RUBY
    out, status = run_app(@env, "bin/rails", "runner", script)
    expect(status).to be_success, out
    expect(out).to include("db=rails_app_test", "rolled_back=nil reservation=false", "committed=pending binary=true steps=4",
                           "outside=pending")
  end

  it "the app's spec with the rspec kit: :tasker_stack runs the app's handlers, and a development database is refused" do
    kit_spec = "spec/app_kit/fulfil_order_kit.rb"
    rspec = ["bundle", "exec", "rspec", "--default-path", "spec/app_kit", kit_spec]
    out, status = run_app(@env.merge("TMPDIR" => @tmp), *rspec)
    expect(status).to be_success, out
    expect(out).to include("2 examples, 0 failures")
    expect(Dir.children(@tmp).grep(/tasker_rspec/)).to eq([])

    # The development database, with tasks in it: the kit refuses to empty it, and they are still there.
    dev_env = @env.merge("RAILS_ENV" => "development", "TASKER_ENV" => "development")
    out, status = run_app(dev_env, "bin/rails", "db:create")
    expect(status).to be_success, out
    out, status = run_app(dev_env, "bin/tasker", "db:migrate")
    expect(status).to be_success, out
    make = 'order = { "order_id" => 9, "items" => [{ "sku" => "A", "quantity" => 1, "unit_price_cents" => 1 }] }; ' \
           '3.times { |i| TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: order.merge("order_id" => i)) }; ' \
           'puts "tasks=#{TaskerCore::Store.with_connection { |c| c.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"] }}"'
    out, status = run_app(dev_env, "bin/rails", "runner", make)
    expect(status).to be_success, out
    expect(out).to include("tasks=3")

    out, status = run_app(dev_env, *rspec)
    expect(status).not_to be_success
    expect(out).to include("TaskerCore::UnsafeDatabaseError", %(refuses to use database "rails_app_development"))
    out, status = run_app(dev_env, "bin/rails", "runner",
                          'puts "tasks=#{TaskerCore::Store.with_connection { |c| c.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"] }}"')
    expect(status).to be_success, out
    expect(out).to include("tasks=3")
  end
end
