# frozen_string_literal: true

require_relative "cli_helpers"

RSpec.describe "tasker task list, task show, workers and cleanup", :db do
  include CLIHelpers
  include StoreHelpers

  ISO_MS = /\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/

  before { clear_workers }

  def exec_sql(sql, params = []) = TaskerCore::Store.with_connection { |c| c.exec(sql, params) }

  describe "task list" do
    # Four tasks: 1 error (order 1), 2 cancelled (order 2), 3 pending in namespace demo; 4 pending, created 3 days ago.
    def seed
      ids = [1, 2, 3, 4].map { |n| create_order_task(n) }
      conn = connect
      fail_steps(conn, claim(conn, limit: 1).to_a, retryable: false)
      TaskerCore.cancel_task(ids[1])
      exec_sql("UPDATE tasker_tasks SET created_at = now() - interval '3 days' WHERE id = $1", [ids[3]])
      ids
    end

    it "lists tasks newest first, filtered by state, name, namespace and age, as a table or JSON" do
      ids = seed
      r = tasker("task", "list", env: db_env)
      expect(r.exitstatus).to eq(0), r.err
      lines = r.out.lines.map(&:rstrip)
      expect(lines.first.split).to eq(%w[ID TASK STATE STEPS_LEFT IDENTITY_KEY CREATED FINISHED])
      expect(lines[2..].map { |l| Integer(l.split.first) }).to eq(ids.reverse)
      expect(lines[2..].map { |l| l.split[2] }).to eq(%w[pending pending cancelled error])
      expect(lines.last.split[1]).to eq("demo/order_fulfilment@1.0.0")
      expect(lines.last.split[5]).to match(ISO_MS)

      json = ->(*args) { JSON.parse(tasker("task", "list", "--json", *args, env: db_env).tap { |x| expect(x.exitstatus).to eq(0), x.err }.out) }
      expect(json.call("--state", "error").map { |t| t["id"] }).to eq([ids[0]])
      expect(json.call("--state", "cancelled").first).to include("id" => ids[1], "state" => "cancelled", "step_count" => 5)
      expect(json.call("--state", "cancelled").first["finished_at"]).to match(ISO_MS)
      expect(json.call("--state", "cancelled").first["created_at"]).to match(ISO_MS)
      expect(json.call("--since", "1d").map { |t| t["id"] }).to eq(ids.first(3).reverse)
      since = (Time.now.utc - 2 * 86_400).iso8601
      expect(json.call("--since", since).size).to eq(3)
      expect(json.call("--limit", "2").map { |t| t["id"] }).to eq([ids[3], ids[2]])
      expect(json.call("--name", "order_fulfilment", "--namespace", "demo").size).to eq(4)
      expect(json.call("--namespace", "other")).to eq([])
      expect(json.call("--name", "nope")).to eq([])
      expect(tasker("task", "list", "--state", "nope", env: db_env).out).to eq("")
      expect(tasker("task", "list", "--name", "nope", env: db_env).out).to eq("no tasks\n")
    end

    it "exits 2 on a bad state, limit or --since" do
      { %w[--state finished] => /--state must be one of pending/, %w[--limit 0] => /--limit must be a positive integer/,
        %w[--since yesterday] => /--since must be a duration/ }.each do |args, message|
        r = tasker("task", "list", *args, env: db_env)
        expect(r.exitstatus).to eq(2), "#{args.join(' ')}: #{r.err}"
        expect(r.err).to match(message)
      end
    end
  end

  it "task show prints each step's output and its whole last error, with the backtrace" do
    id = create_order_task
    conn = connect
    succeed(conn, claim(conn).to_a, output: ->(_) { { "note" => "<b>ok</b>" } })
    claimed = claim(conn).to_a
    long = "card declined by the issuing bank after three attempts to reach the 3-D Secure service; " \
           "the customer should try another card \e[31mor call the bank"
    apply(conn, claimed.map do |row|
      { step_id: row["step_id"], attempt: row["attempt"], success: false, output: nil, retryable: false,
        error: { "class" => "PaymentDeclined", "message" => long, "backtrace" => ["handlers.rb:12:in `call'"] } }
    end)
    r = tasker("task", "show", id, env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    expect(r.out).to include(%(  output: {"note":"<b>ok</b>"}))
    expect(r.out).to include("    PaymentDeclined: #{long.sub("\e", '\\e')}") # terminal escapes shown as text
    expect(r.out).to include("      handlers.rb:12:in `call'")
    expect(r.out).to match(/^  last error at \S+:$/)
    expect(r.out).not_to include("\e")
    expect(r.out[/^created (\S+)/, 1]).to match(ISO_MS)

    json = JSON.parse(tasker("task", "show", id, "--json", env: db_env).out)
    expect(json["created_at"]).to match(ISO_MS)
    expect(json["steps"].first["finished_at"]).to match(ISO_MS)
    expect(json["steps"].map { |s| s["error"] }.compact.first).to include("message" => long)
  end

  it "workers lists live workers, or all of them with --all, as a table or JSON" do
    exec_sql(<<~SQL)
      INSERT INTO tasker_workers (id, owner, host, pid, capacity, in_flight, last_heartbeat_at, connected, updated_at)
      VALUES ('w-live', 'orch-a', 'box-a', 101, 10, 3, now(), true, now()),
             ('w-gone', 'orch-a', 'box-b', 102, 10, 0, now(), false, now())
    SQL
    r = tasker("workers", env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    rows = r.out.lines.drop(2).map(&:split)
    expect(rows.map { |row| row[0..6] }).to eq([%w[w-live box-a 101 default 10 orch-a 3]])
    expect(rows.first[7]).to match(ISO_MS)

    all = JSON.parse(tasker("workers", "--all", "--json", env: db_env).out)
    expect(all.map { |w| w.values_at("id", "live", "orchestrator") }).to eq([["w-gone", false, "orch-a"], ["w-live", true, "orch-a"]])
    expect(all.first["last_heartbeat_at"]).to match(ISO_MS)
    expect(tasker("workers", "--all", env: db_env).out.lines.first.split.last).to eq("LIVE")
    exec_sql("DELETE FROM tasker_workers")
    expect(tasker("workers", env: db_env).out).to eq("no live workers\n")
  end

  describe "cleanup" do
    it "deletes the finished tasks older than --older-than with their rows, and only those" do
      old, recent, unfinished = [1, 2, 3].map { |n| create_order_task(n) }
      [old, recent].each { |id| TaskerCore.cancel_task(id) }
      exec_sql("UPDATE tasker_tasks SET finished_at = now() - interval '8 days' WHERE id = $1", [old])
      exec_sql("UPDATE tasker_tasks SET created_at = now() - interval '30 days' WHERE id = $1", [unfinished])

      r = tasker("cleanup", "--older-than", "7d", env: db_env)
      expect(r.exitstatus).to eq(0), r.err
      expect(r.out).to eq("deleted 1 finished task (5 steps) that finished more than 7d ago\n")
      expect(exec_sql("SELECT id FROM tasker_tasks ORDER BY id").map { |t| t["id"] }).to eq([recent, unfinished])
      expect(exec_sql("SELECT count(*)::int AS n FROM tasker_workflow_steps WHERE task_id = $1", [old]).first["n"]).to eq(0)
      expect(exec_sql("SELECT count(*)::int AS n FROM tasker_task_transitions WHERE task_id = $1", [old]).first["n"]).to eq(0)
      expect(exec_sql("SELECT count(*)::int AS n FROM tasker_workflow_step_transitions WHERE task_id = $1", [old]).first["n"]).to eq(0)

      r = tasker("cleanup", "--older-than", "7d", "--json", env: db_env)
      expect(JSON.parse(r.out)).to include("tasks" => 0, "steps" => 0, "older_than_seconds" => 604_800)
    end

    it "exits 1 while another cleaner holds the lock, and 2 on a bad duration" do
      holder = connect
      holder.exec("SELECT pg_advisory_lock($1)", [TaskerCore::Retention::LOCK_KEY])
      r = tasker("cleanup", "--older-than", "1d", env: db_env)
      expect(r.exitstatus).to eq(1)
      expect(r.err_lines).to eq(["tasker cleanup: another process is cleaning up this database; try again later"])
      holder.exec("SELECT pg_advisory_unlock($1)", [TaskerCore::Retention::LOCK_KEY])

      r = tasker("cleanup", "--older-than", "7 days", env: db_env)
      expect(r.exitstatus).to eq(2)
      expect(r.err).to include("--older-than: expected a duration such as 7d")
    end
  end
end
