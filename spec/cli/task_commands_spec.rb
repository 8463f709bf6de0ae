# frozen_string_literal: true

require_relative "cli_helpers"

RSpec.describe "tasker db:migrate, task and step commands", :db do
  include CLIHelpers
  include StoreHelpers

  it "db:migrate reports the schema as up to date on a migrated database" do
    r = tasker("db:migrate", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    expect(r.out).to match(/\Adatabase schema is up to date \(version \d+\)\n\z/)
  end

  it "db:migrate creates the schema in an empty database" do
    name = "tasker_cli_#{Process.pid}_#{rand(1 << 30)}"
    admin = connect(db_url.sub(%r{/[^/]+\z}, "/postgres"))
    admin.exec(%(CREATE DATABASE "#{name}"))
    url = db_url.sub(%r{/[^/]+\z}, "/#{name}")
    r = tasker("db:migrate", env: { "DATABASE_URL" => url })
    expect(r.exitstatus).to eq(0), r.err
    expect(r.out).to start_with("applied migration")
    tables = connect(url).exec("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'tasker_tasks'").first["n"]
    expect(tables).to eq(1)
  ensure
    close_db_connections
    admin = connect(db_url.sub(%r{/[^/]+\z}, "/postgres"))
    admin.exec(%(DROP DATABASE IF EXISTS "#{name}"))
  end

  it "task create prints the new task's id; the same identity key returns it again" do
    args = ["task", "create", "order_fulfilment", "--namespace", "demo", "--templates", CLIHelpers::TEMPLATES,
            "--context", JSON.generate(order_context(11)), "--identity-key", "order-11"]
    first = tasker(*args, env: db_env)
    expect(first.exitstatus).to eq(0), first.err
    id = Integer(first.out.strip)
    expect(TaskerCore.task(id)).to include(name: "order_fulfilment", namespace: "demo", status: "pending",
                                           context: order_context(11), identity_key: "order-11")
    again = tasker(*args, "--json", env: db_env)
    expect(JSON.parse(again.out)).to eq("task_id" => id)
  end

  it "task create takes --queue, --priority and --delay, and refuses a bad queue naming the key, exit 1" do
    base = ["task", "create", "order_fulfilment", "--namespace", "demo", "--templates", CLIHelpers::TEMPLATES,
            "--context", JSON.generate(order_context(12))]
    r = tasker(*base, "--queue", "bulk", "--priority", "7", "--delay", "600", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    steps = TaskerCore.task(Integer(r.out.strip))[:steps]
    expect(steps.map { |s| [s[:queue], s[:priority]] }.uniq).to eq([["bulk", 7]])
    expect(steps.map { |s| s[:next_attempt_at] }).to all(be > Time.now + 500)
    r = tasker(*base, "--queue", "no spaces", env: db_env)
    expect([r.exitstatus, r.err_lines.size]).to eq([1, 1])
    expect(r.err).to include("queue: expected a queue name")
  end

  it "task create fails in one line, exit 1, on a context that is not JSON and creates nothing" do
    r = tasker("task", "create", "order_fulfilment", "--namespace", "demo", "--templates", CLIHelpers::TEMPLATES,
               "--context", '{"order_id": 1', env: db_env)
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines.size).to eq(1)
    expect(r.err).to start_with("tasker task create: --context is not valid JSON")
    expect(r.out).to be_empty
    expect(TaskerCore::Store.with_connection { |c| c.exec("SELECT count(*)::int AS n FROM tasker_tasks").first["n"] }).to eq(0)
  end

  it "task create reports an unknown template or a context that breaks the schema, exit 1" do
    r = tasker("task", "create", "nope", "--templates", CLIHelpers::TEMPLATES, env: db_env)
    expect([r.exitstatus, r.err_lines.size]).to eq([1, 1])
    expect(r.err).to include("no task template default/nope")
    r = tasker("task", "create", "order_fulfilment", "--namespace", "demo", "--templates", CLIHelpers::TEMPLATES,
               "--context", '{"order_id": 1}', env: db_env)
    expect([r.exitstatus, r.err_lines.size]).to eq([1, 1])
    expect(r.err).to include("context_schema", "customer_email")
  end

  it "task show prints the task and a table of its steps, or JSON" do
    id = create_order_task
    r = tasker("task", "show", id, env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    lines = r.out.lines.map(&:rstrip)
    expect(lines.first).to eq("task #{id}  demo/order_fulfilment@1.0.0  pending")
    header = lines.index { |l| l.start_with?("STEP") }
    expect(lines[header].split).to eq(%w[STEP NAME STATE ATTEMPTS FAILURES DEPENDS_ON DURATION FINISHED])
    rows = lines[(header + 2)..].map(&:split)
    expect(rows.map { |r| r[1] }).to eq(%w[validate_order reserve_inventory charge_payment ship_order notify_customer])
    expect(rows.map { |r| r[2] }.uniq).to eq(["pending"])
    # attempts: times claimed; failures against the retry budget (max_attempts)
    expect(rows.map { |r| r[3] }.uniq).to eq(["0"])
    expect(rows.map { |r| r[4] }).to all(match(%r{\A0/[1-9]\d*\z}))
    expect(rows[3][5]).to eq("charge_payment,reserve_inventory")

    json = JSON.parse(tasker("task", "show", id, "--json", env: db_env).out)
    expect(json["id"]).to eq(id)
    expect(json["steps"].size).to eq(5)
    expect(json["context"]).to eq(order_context)
  end

  it "task show --json renders a binary output value as {\"$binary\": base64}" do
    id = create_order_task
    conn = connect
    row = claim(conn).first
    blob = "\xFF\x00tasker\xC3".b
    apply(conn, [{ step_id: row["step_id"], attempt: row["attempt"], output: { "blob" => blob, "text" => "ok" } }])
    r = tasker("task", "show", id, "--json", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    step = JSON.parse(r.out)["steps"].find { |s| s["id"] == row["step_id"] }
    expect(step["state"]).to eq("complete")
    expect(step["output"]).to eq("blob" => { "$binary" => [blob].pack("m0") }, "text" => "ok")
    expect(step["output"]["blob"]["$binary"].unpack1("m0")).to eq(blob)
    expect(tasker("task", "show", id, env: db_env).exitstatus).to eq(0)
  end

  it "task show and task cancel fail in one line, exit 1, for a task that does not exist" do
    %w[show cancel].each do |sub|
      r = tasker("task", sub, 999_999, env: db_env)
      expect(r.exitstatus).to eq(1)
      expect(r.err_lines).to eq(["tasker task #{sub}: there is no task 999999"])
    end
  end

  it "task cancel cancels an unfinished task, and says so when it is already cancelled" do
    id = create_order_task
    r = tasker("task", "cancel", id, env: db_env)
    expect([r.exitstatus, r.out]).to eq([0, "task #{id} cancelled\n"])
    expect(TaskerCore.task(id)[:status]).to eq("cancelled")
    r = tasker("task", "cancel", id, env: db_env)
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines).to eq(["tasker task cancel: task #{id} was not cancelled: it is already cancelled"])
  end

  it "step retry puts a step in error back to pending, and refuses a step that is not in error" do
    id = create_order_task
    conn = connect
    claimed = claim(conn).to_a
    expect(claimed.map { |r| r["step_name"] }).to eq(["validate_order"])
    fail_steps(conn, claimed, retryable: false)
    step_id = claimed.first["step_id"]
    expect(TaskerCore.task(id)[:status]).to eq("error")

    r = tasker("step", "retry", step_id, env: db_env)
    expect([r.exitstatus, r.out]).to eq([0, "step #{step_id} will be retried\n"])
    expect(TaskerCore.task(id)[:steps].first).to include(state: "pending", failures: 0)

    r = tasker("step", "retry", step_id, env: db_env)
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines).to eq(["tasker step retry: step #{step_id} was not retried: only a step in error can be, " \
                               "and it is pending"])
  end

  it "step resolve completes a step by hand with its output; its dependents become ready" do
    id = create_order_task
    step_id = TaskerCore.task(id)[:steps].first[:id]
    r = tasker("step", "resolve", step_id, "--output", '{"order_id": 7, "total_cents": 2500}', env: db_env)
    expect([r.exitstatus, r.out]).to eq([0, "step #{step_id} resolved\n"])
    step = TaskerCore.task(id)[:steps].first
    expect(step).to include(state: "resolved_manually", output: { "order_id" => 7, "total_cents" => 2500 })
    expect(claim(connect).map { |row| row["step_name"] }.sort).to eq(%w[charge_payment reserve_inventory])

    r = tasker("step", "resolve", step_id, "--output", "{}", env: db_env)
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines).to eq(["tasker step resolve: step #{step_id} was not resolved: it is already resolved_manually"])
    r = tasker("step", "resolve", step_id, "--output", "nope", env: db_env)
    expect(r.exitstatus).to eq(1)
    expect(r.err_lines.first).to start_with("tasker step resolve: --output is not valid JSON")
  end
end
