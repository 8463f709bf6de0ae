# frozen_string_literal: true

require_relative "cli_helpers"

RSpec.describe "tasker status", :db do
  include CLIHelpers

  before { clear_workers }
  include StoreHelpers

  # Two tasks: one with its first step completed, one cancelled.
  def seed_tasks
    first = create_order_task(1)
    second = create_order_task(2)
    conn = connect
    claimed = claim(conn, limit: 1).to_a
    succeed(conn, claimed)
    TaskerCore.cancel_task(second)
    [first, second]
  end

  it "shows tasks and steps by state, throughput and workers as tables" do
    seed_tasks
    r = tasker("status", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    tasks = r.out[/^Tasks\n(.*?)\n\n/m, 1].lines.drop(2).to_h { |l| l.split.then { |s, n| [s, Integer(n)] } }
    expect(tasks).to eq("pending" => 0, "in_progress" => 1, "complete" => 0, "error" => 0, "cancelled" => 1)
    steps = r.out[/^Steps\n(.*?)\n\n/m, 1].lines.drop(2).to_h { |l| l.split.then { |s, n| [s, Integer(n)] } }
    expect(steps).to include("complete" => 1, "pending" => 4, "cancelled" => 5)
    expect(r.out).to match(%r{^Throughput: 0\.02 steps/s completed over the last 60s$})
    workers_table = TaskerCore::Store.with_connection { |c| c.exec("SELECT to_regclass('tasker_workers') IS NOT NULL AS ok").first["ok"] }
    expect(r.out).to include(workers_table ? "Workers: none live" : "Workers: unknown (no tasker_workers table")
  end

  it "shows per queue the steps ready, waiting and in flight and the workers serving it, naming unserved queues" do
    seed_tasks
    use_templates(template("later", [step("a")]))
    TaskerCore.create_task(name: "later", queue: "later", run_at: Time.now + 3600)
    connect.exec(<<~SQL)
      SELECT tasker_upsert_workers('orch-test', ARRAY['worker-1'], ARRAY['host-a'], ARRAY[4242], ARRAY[8], ARRAY[0],
                                   ARRAY[extract(epoch FROM now())::float8], ARRAY[0], ARRAY[0], ARRAY[NULL],
                                   ARRAY[NULL]::float8[], ARRAY['api'])
    SQL
    r = tasker("status", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    queues = r.out[/^Queues
(.*?)
(?:Ready|
)/m, 1].lines.drop(2).to_h { |l| l.split.then { |q, *rest| [q, rest] } }
    expect(queues).to eq("api" => %w[0 0 0 - 1 8], "default" => %w[2 0 0 - 0 0], "later" => %w[0 1 0 - 0 0])
    expect(r.out).to include("Ready steps and no live worker serving the queue default: start a worker with --queues default")
    report = JSON.parse(tasker("status", "--json", env: db_env).out)
    expect(report["queues"].find { |q| q["queue"] == "default" }).to include("ready" => 2, "workers" => 0, "unserved" => true)
  end

  it "prints the same as JSON with --json" do
    seed_tasks
    r = tasker("status", "--json", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    report = JSON.parse(r.out)
    expect(report["tasks"]).to include("in_progress" => 1, "cancelled" => 1, "complete" => 0)
    expect(report["steps"]).to include("complete" => 1, "cancelled" => 5)
    expect(report["steps_per_second"]).to eq(0.02)
    expect(report["window_seconds"]).to eq(60)
    expect(report["workers"]).to eq([]) # none live (the loop's migration is in)
  end

  it "shows the recurring tasks with their last and next ticks, and ActiveJob jobs by class and state" do
    dir = Dir.mktmpdir("status_recurring")
    config = File.join(dir, "tasker-config.yml")
    File.write(config, <<~YAML)
      default:
        recurring:
          - { name: hourly_orders, task: order_fulfilment, namespace: demo, cron: "@hourly" }
          - { name: nightly, task: order_fulfilment, namespace: demo, cron: "30 2 * * * UTC" }
    YAML
    job = lambda do |klass, n|
      { name: "perform", namespace: "active_job", version: "1", context: { "job_class" => klass },
        identity_key: "active_job/#{klass}/job-#{n}/0" }
    end
    ids = TaskerCore::Tasks.create_tasks([job.("ReportJob", 1), job.("ReportJob", 2), job.("Admin::MailJob", 3)],
                                         templates: TaskerCore::JobAdapter.templates)
    TaskerCore.cancel_task(ids.last)
    timeouts = TaskerCore::Store.with_connection { |c| c.exec("SELECT DISTINCT timeout_ms FROM tasker_workflow_steps").map { |r| r["timeout_ms"] } }
    expect(timeouts).to eq([3_600_000]) # active_job.timeout_ms, not worker.step_timeout_ms
    TaskerCore::Store.with_connection do |c|
      c.exec("INSERT INTO tasker_recurring_schedules (name, last_tick_at, last_task_id) VALUES ('hourly_orders', '2026-01-02T03:00:00Z', 77)")
    end

    r = tasker("status", "--json", env: db_env.merge("TASKER_CONFIG_PATH" => config))
    expect(r.exitstatus).to eq(0), r.err
    report = JSON.parse(r.out)
    hourly, nightly = report["recurring"]
    expect(hourly).to include("name" => "hourly_orders", "task" => "demo/order_fulfilment", "cron" => "@hourly",
                              "last_tick_at" => "2026-01-02T03:00:00Z", "last_task_id" => 77)
    expect(Time.iso8601(hourly["next_tick_at"])).to be_between(Time.now, Time.now + 3600)
    expect(nightly).to include("last_tick_at" => nil, "last_task_id" => nil)
    expect(nightly["next_tick_at"]).to match(/T02:30:00Z\z/)
    expect(report["jobs"]).to eq([{ "job_class" => "ReportJob", "state" => "pending", "count" => 2 },
                                  { "job_class" => "Admin::MailJob", "state" => "cancelled", "count" => 1 }])

    r = tasker("status", env: db_env.merge("TASKER_CONFIG_PATH" => config))
    expect(r.out).to include("Recurring tasks (2)", "ActiveJob jobs (tasks of active_job/perform) by class")
    expect(r.out.lines.find { |l| l.start_with?("hourly_orders") }.split.first(5))
      .to eq(%w[hourly_orders demo/order_fulfilment @hourly 2026-01-02T03:00:00Z 77])
    expect(r.out.lines.find { |l| l.start_with?("ReportJob") }.split).to eq(%w[ReportJob pending 2])
  end

  it "lists live workers from tasker_workers, leaving out disconnected and silent ones" do
    name = "tasker_cli_status_#{Process.pid}_#{rand(1 << 30)}"
    base = db_url.sub(%r{/[^/]+\z}, "")
    connect("#{base}/postgres").exec(%(CREATE DATABASE "#{name}"))
    url = "#{base}/#{name}"
    expect(tasker("db:migrate", env: { "DATABASE_URL" => url }).exitstatus).to eq(0)
    conn = connect(url)
    # The orchestration loop's migration creates this table; the columns are the shared contract.
    conn.exec(<<~SQL)
      CREATE TABLE IF NOT EXISTS tasker_workers (id text PRIMARY KEY, owner text, host text, pid int, capacity int,
        in_flight int, last_heartbeat_at timestamptz, connected boolean, updated_at timestamptz)
    SQL
    conn.exec(<<~SQL)
      INSERT INTO tasker_workers VALUES
        ('w-live', 'orch', 'box-a', 101, 10, 3, now(), true, now()),
        ('w-gone', 'orch', 'box-b', 102, 10, 0, now(), false, now()),
        ('w-silent', 'orch', 'box-c', 103, 10, 0, now() - interval '1 hour', true, now())
    SQL
    conn.exec(<<~SQL)
      UPDATE tasker_workers SET connects = 3, disconnects = 1, last_connection_event = 'connected',
             last_connection_event_at = '2026-01-02T03:04:05.678Z' WHERE id = 'w-live'
    SQL
    r = tasker("status", "--json", env: { "DATABASE_URL" => url })
    expect(r.exitstatus).to eq(0), r.err
    workers = JSON.parse(r.out)["workers"]
    expect(workers.map { |w| w.values_at("id", "host", "pid", "capacity", "in_flight") }).to eq([["w-live", "box-a", 101, 10, 3]])
    expect(workers.first["last_heartbeat_at"]).to match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/)
    expect(workers.first).to include("connects" => 3, "disconnects" => 1, "last_connection_event" => "connected",
                                     "last_connection_event_at" => "2026-01-02T03:04:05.678Z")

    r = tasker("status", env: { "DATABASE_URL" => url })
    expect(r.out).to include("Workers (1 live)")
    row = r.out.lines.find { |l| l.start_with?("w-live") }.split
    expect(row[0..5]).to eq(%w[w-live box-a 101 default 10 3])
    expect(r.out).to include("CONNECTS/DISCONNECTS", "LAST_EVENT(AT)")
    expect(row[-3..]).to eq(["3/1", "connected", "(2026-01-02T03:04:05.678Z)"])
  ensure
    close_db_connections
    connect("#{base}/postgres").exec(%(DROP DATABASE IF EXISTS "#{name}")) if name
  end

  it "says in one line when the schema is missing" do
    name = "tasker_cli_empty_#{Process.pid}_#{rand(1 << 30)}"
    base = db_url.sub(%r{/[^/]+\z}, "")
    connect("#{base}/postgres").exec(%(CREATE DATABASE "#{name}"))
    r = tasker("status", env: { "DATABASE_URL" => "#{base}/#{name}" })
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines.size).to eq(1)
    expect(r.err).to include("tasker_tasks", "run `tasker db:migrate`")
  ensure
    close_db_connections
    connect("#{base}/postgres").exec(%(DROP DATABASE IF EXISTS "#{name}")) if name
  end
end
