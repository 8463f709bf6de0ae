# frozen_string_literal: true

# Queues, priorities, scheduled start and concurrency limits: templates,
# create_task and the claim (tasker_claim_steps_v4, db/migrate/0011) on a
# real PostgreSQL.
RSpec.describe "Queues, priorities, scheduled start and concurrency limits", :db do
  let(:conn) { connect }

  def claim_v4(conn, queues:, limit: 100, room: nil, limited: {}, owner: "orch-1", suspect_limit: 0)
    conn.exec(<<~SQL, [owner, 60_000, 2, suspect_limit, limit, PG_TEXT[queues], PG_INT[room || queues.map { limit }],
      SELECT * FROM tasker_claim_steps_v4($1, $2::int, $3::int, $4::int, $5::int, $6::text[], $7::int[],
                                          $8::text[], $9::int[])
    SQL
                       PG_TEXT[limited.keys.map(&:to_s)], PG_INT[limited.values]]).to_a
  end

  PG_TEXT = ->(a) { "{#{a.map { |x| %("#{x}") }.join(',')}}" }
  PG_INT = ->(a) { "{#{a.join(',')}}" }

  def steps_of(id) = TaskerCore.task(id)[:steps].to_h { |s| [s[:name], s] }

  def finish(conn, rows)
    apply(conn, rows.map { |r| { step_id: r["step_id"], attempt: r["attempt"], success: true, output: {} } })
  end

  describe "templates" do
    it "reads queue, priority and concurrency at template and step level" do
      t = template("q", [step("a", queue: "api", priority: 5, concurrency: { key: "k-%{context.id}", limit: 2 }),
                         step("b", ["a"])],
                   queue: "work", priority: -3, concurrency: { "key" => "all", "limit" => 4 })
      expect([t.queue, t.priority, t.concurrency]).to eq(["work", -3, { "key" => "all", "limit" => 4 }])
      expect(t.step("a").to_h.values_at(:queue, :priority)).to eq(["api", 5])
      expect(t.placement({ "id" => 7 })).to eq([["api", 5, "k-7", 2], ["work", -3, "all", 4]])
      expect(t.placement({ "id" => 7 }, queue: "other", priority: 9)).to eq([["api", 5, "k-7", 2], ["other", 9, "all", 4]])
      expect(template("plain", [step("a")]).placement({})).to eq([["default", 0, nil, nil]])
    end

    {
      { queue: "has space" } => /\(template default\/bad\): queue: expected a queue name/,
      { priority: 101 } => /priority: expected an Integer between -100 and 100/,
      { priority: "high" } => /priority: expected an Integer/,
      { concurrency: { key: "x", limit: 0 } } => /concurrency.limit: expected an Integer >= 1, got 0/,
      { concurrency: { key: "x", limit: 1, scope: "y" } } => /concurrency: unknown key "scope"/,
      { concurrency: { key: "%{task.id}", limit: 1 } } => /concurrency.key: only %\{context.<path>\}/,
      { concurrency: 3 } => /concurrency: expected a mapping/
    }.each do |extra, message|
      it "refuses #{extra.inspect} at template and step level, naming file, template and key" do
        expect { template("bad", [step("a")], **extra) }.to raise_error(TaskerCore::ConfigurationError, message)
        expect { template("bad", [step("a", **extra)]) }
          .to raise_error(TaskerCore::ConfigurationError, /\(inline template\) \(template default\/bad\): step "a": /)
      end
    end

    it "refuses an unknown key naming the known ones" do
      expect { template("bad", [step("a", queues: "x")]) }
        .to raise_error(TaskerCore::ConfigurationError, /step "a": unknown key "queues" \(known: .*queue, priority, concurrency\)/)
    end
  end

  describe "configuration" do
    def load(yaml)
      path = File.join(Dir.mktmpdir("tasker_queues_config"), "tasker-config.yml")
      File.write(path, yaml)
      TaskerCore::Config.load(path: path, env: "test")
    end

    it "reads per-queue limits and the worker's queues" do
      c = load("default:\n  queues:\n    api: { concurrency: 5 }\n    bulk: {}\n  worker:\n    queues: [critical, default]\n")
      expect(TaskerCore::Queues.configured_limits(c)).to eq("api" => 5)
      expect(c.worker["queues"]).to eq(%w[critical default])
      expect(TaskerCore::Worker::Settings.build(config: c).queues).to eq(%w[critical default])
      expect(TaskerCore::Worker::Settings.build(config: c, queues: "py").queues).to eq(%w[py])
    end

    {
      "queues:\n    api: { concurrency: 0 }" => /tasker-config.yml \(section "default"\): queues.api.concurrency: expected an Integer >= 1, got 0/,
      "queues:\n    api: { burst: 3 }" => /queues.api.burst: unknown queue option \(known: concurrency\)/,
      "queues:\n    'bad name': { concurrency: 1 }" => /queues: expected a queue name/,
      "queues: [api]" => /queues: expected a mapping of queue names/,
      "worker:\n    queues: [ok, 'not ok']" => /worker.queues: expected a list of 1 to 16 queue names/,
      "worker:\n    queues: []" => /worker.queues: expected a list of 1 to 16 queue names/
    }.each do |yaml, message|
      it "refuses #{yaml.lines.last.strip} naming the file and key" do
        expect { load("default:\n  #{yaml}\n") }.to raise_error(TaskerCore::ConfigurationError, message)
      end
    end
  end

  it "passes the configured limits to the claim as arrays whatever the queue names (null, NULL)" do
    names, limits = TaskerCore::OrchestrationHandle.queue_limit_literals("null" => 2, "NULL" => 3, "a.b:c-d" => 1)
    row = conn.exec("SELECT $1::text[] AS names, $2::int[] AS limits", [names, limits]).first
    expect([row["names"], row["limits"]]).to eq([%w[null NULL a.b:c-d], [2, 3, 1]])
  end

  describe "create_task" do
    before do
      use_templates(template("two", [step("a", queue: "api"), step("b", ["a"])], priority: 2),
                    template("keyed", [step("a")], concurrency: { key: "cust-%{context.customer.id}", limit: 1 }))
    end

    it "stores queue (the step's, else the task's, else the template's, else default) and priority" do
      s = steps_of(TaskerCore.create_task(name: "two"))
      expect(s.transform_values { |x| [x[:queue], x[:priority]] }).to eq("a" => ["api", 2], "b" => ["default", 2])
      s = steps_of(TaskerCore.create_task(name: "two", queue: "bulk", priority: -7))
      expect(s.transform_values { |x| [x[:queue], x[:priority]] }).to eq("a" => ["api", -7], "b" => ["bulk", -7])
    end

    it "places each entry of one create_tasks call on its own (per task and step when they differ)" do
      ids = TaskerCore.create_tasks([{ name: "two", queue: "q1" }, { name: "two", priority: 9 },
                                     { name: "keyed", context: { "customer" => { "id" => 1 } } },
                                     { name: "keyed", context: { "customer" => { "id" => 2 } } }])
      expect(steps_of(ids[0]).transform_values { |x| [x[:queue], x[:priority]] }).to eq("a" => ["api", 2], "b" => ["q1", 2])
      expect(steps_of(ids[1]).transform_values { |x| [x[:queue], x[:priority]] }).to eq("a" => ["api", 9], "b" => ["default", 9])
      expect(ids[2..].map { |id| steps_of(id)["a"][:concurrency_key] }).to eq(%w[cust-1 cust-2])
    end

    it "computes the concurrency key from the context and refuses a context without it" do
      s = steps_of(TaskerCore.create_task(name: "keyed", context: { "customer" => { "id" => 42 } }))
      expect(s["a"].values_at(:concurrency_key, :concurrency_limit)).to eq(["cust-42", 1])
      expect { TaskerCore.create_task(name: "keyed", context: { "customer" => {} }) }
        .to raise_error(TaskerCore::ValidationError, /default\/keyed@0.1.0: concurrency.key .* needs context.customer.id/)
    end

    it "starts steps no earlier than run_at or delay (database clock for delay)" do
      at = Time.now + 3600
      a = steps_of(TaskerCore.create_task(name: "two", run_at: at))
      expect(a["a"][:next_attempt_at]).to be_within(0.001).of(at)
      d = steps_of(TaskerCore.create_task(name: "two", delay: 120))
      db_now = conn.exec("SELECT extract(epoch FROM now())::float8 AS t").first["t"]
      expect(d["a"][:next_attempt_at].to_f).to be_within(5).of(db_now + 120)
      ids = TaskerCore.create_tasks([{ name: "two", delay: 60 }, { name: "two" }])
      expect(steps_of(ids[0])["a"][:next_attempt_at]).to be > Time.now + 30
      expect(steps_of(ids[1])["a"][:next_attempt_at]).to be <= Time.now + 1
    end

    {
      { queue: "no spaces" } => /two@0.1.0: queue: expected a queue name/,
      { priority: 1000 } => /priority: expected an Integer between -100 and 100/,
      { priority: 1.5 } => /priority: expected an Integer/,
      { run_at: "tomorrow" } => /run_at: expected a Time, got "tomorrow" \(String\)/,
      { run_at: 1_700_000_000 } => /run_at: expected a Time/,
      { delay: -1 } => /delay: expected a number of seconds >= 0/,
      { delay: "5" } => /delay: expected a number of seconds/,
      { run_at: Time.now, delay: 1 } => /run_at: give run_at or delay, not both/
    }.each do |extra, message|
      it "refuses #{extra.inspect} with ValidationError naming the key, creating nothing" do
        expect { TaskerCore.create_task(name: "two", **extra) }.to raise_error(TaskerCore::ValidationError, message)
        expect { TaskerCore.create_tasks([{ name: "two" }, { name: "two", **extra }]) }
          .to raise_error(TaskerCore::ValidationError, message)
        expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(0)
      end
    end
  end

  describe "the claim" do
    before do
      use_templates(template("one", [step("a")]),
                    template("keyed", [step("a")], concurrency: { key: "%{context.c}", limit: 2 }))
    end

    it "claims only the queues asked for, each up to its room, and returns the queue" do
      ids = %w[a a b c].map { |q| TaskerCore.create_task(name: "one", queue: q) }
      rows = claim_v4(conn, queues: %w[a b], room: [1, 5])
      expect(rows.map { |r| [r["task_id"], r["queue"]] }).to contain_exactly([ids[0], "a"], [ids[2], "b"])
      expect(claim_v4(conn, queues: %w[c]).map { |r| r["task_id"] }).to eq([ids[3]])
    end

    it "orders by priority within a queue, with a second of waiting worth a point" do
      old = TaskerCore.create_task(name: "one", priority: 0)
      conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() - interval '30 seconds' WHERE task_id = $1",
                [old])
      low = TaskerCore.create_task(name: "one", priority: -5)
      high = TaskerCore.create_task(name: "one", priority: 10)
      mid = TaskerCore.create_task(name: "one", priority: 20)
      # old waited 30 s: it counts as priority 30 now, ahead of 20 and 10.
      order = 4.times.map { claim_v4(conn, queues: ["default"], limit: 1).first["task_id"] }
      expect(order).to eq([old, mid, high, low])
    end

    it "older orchestrators' claims take the queue default only" do
      TaskerCore.create_task(name: "one", queue: "api")
      d = TaskerCore.create_task(name: "one")
      expect(claim(conn).map { |r| r["task_id"] }).to eq([d])
      expect(claim(conn).to_a).to eq([])
    end

    it "leaves steps scheduled for later alone and claims them once due" do
      later = TaskerCore.create_task(name: "one", run_at: Time.now + 3600)
      now = TaskerCore.create_task(name: "one")
      expect(claim_v4(conn, queues: ["default"]).map { |r| r["task_id"] }).to eq([now])
      conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() WHERE task_id = $1", [later])
      expect(claim_v4(conn, queues: ["default"]).map { |r| r["task_id"] }).to eq([later])
    end

    it "does not read the steps scheduled for later: the claim's index scan stops before them" do
      TaskerCore.create_tasks(Array.new(300) { { name: "one", run_at: Time.now + 3600 } } + Array.new(3) { { name: "one" } })
      conn.transaction do
        expect(claim_v4(conn, queues: ["default"], limit: 100).size).to eq(3)
        read = conn.exec("SELECT pg_stat_get_xact_tuples_returned('tasker_workflow_steps_queue_ready'::regclass) AS n")
                   .first["n"]
        expect(read).to be_between(3, 10)
      end
    end

    it "keeps a queue's concurrency limit across claims and connections" do
      5.times { TaskerCore.create_task(name: "one", queue: "api") }
      other = connect
      first = claim_v4(conn, queues: ["api"], limited: { api: 3 }, limit: 2)
      second = claim_v4(other, queues: ["api"], limited: { api: 3 }, owner: "orch-2")
      expect([first.size, second.size]).to eq([2, 1])
      expect(claim_v4(conn, queues: ["api"], limited: { api: 3 })).to eq([])
      finish(conn, first)
      expect(claim_v4(other, queues: ["api"], limited: { api: 3 }).size).to eq(2)
    end

    it "does not let a queue at its limit take the claim's places from the other queues" do
      TaskerCore.create_task(name: "one", queue: "partner_api")
      busy = claim_v4(conn, queues: ["partner_api"], limited: { partner_api: 1 })
      expect(busy.size).to eq(1)
      # An older backlog on the full queue, then newer steps on default.
      backlog = Array.new(3) { TaskerCore.create_task(name: "one", queue: "partner_api") }
      conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() - interval '60 seconds' " \
                "WHERE task_id = ANY ($1::bigint[])", [PG_INT[backlog]])
      fresh = Array.new(3) { TaskerCore.create_task(name: "one") }
      rows = claim_v4(conn, queues: %w[default partner_api], room: [3, 3], limit: 3, limited: { partner_api: 1 })
      expect(rows.map { |r| r["task_id"] }).to match_array(fresh)
      finish(conn, busy)
      rows = claim_v4(conn, queues: %w[default partner_api], room: [3, 3], limit: 3, limited: { partner_api: 1 })
      expect(rows.map { |r| r["task_id"] }).to eq([backlog.first])
    end

    it "returns the claimed steps in claim order, and a step released unsent keeps its place" do
      low = TaskerCore.create_task(name: "one", priority: -50)
      high = TaskerCore.create_task(name: "one", priority: 50)
      mid = TaskerCore.create_task(name: "one", priority: 0)
      rows = claim_v4(conn, queues: ["default"], limit: 10)
      expect(rows.map { |r| r["task_id"] }).to eq([high, mid, low])
      later = TaskerCore.create_task(name: "one", priority: 0)
      before = conn.exec("SELECT id, next_attempt_at FROM tasker_workflow_steps ORDER BY id").to_a
      conn.exec("SELECT tasker_release_steps($1::bigint[], $2::int[])",
                [PG_INT[rows.map { |r| r["step_id"] }], PG_INT[rows.map { |r| r["attempt"] }]])
      expect(conn.exec("SELECT id, next_attempt_at FROM tasker_workflow_steps ORDER BY id").to_a).to eq(before)
      expect(claim_v4(conn, queues: ["default"], limit: 10).map { |r| r["task_id"] }).to eq([high, mid, later, low])
    end

    it "keeps a key's limit, and other keys are not held up behind a full one" do
      4.times { TaskerCore.create_task(name: "keyed", context: { "c" => "x" }) }
      y = TaskerCore.create_task(name: "keyed", context: { "c" => "y" })
      rows = claim_v4(conn, queues: ["default"], limit: 10)
      expect(rows.map { |r| r["task_id"] }).to include(y)
      expect(rows.size).to eq(3)
      expect(claim_v4(connect, queues: ["default"], owner: "orch-2")).to eq([])
      finish(conn, rows.first(1))
      expect(claim_v4(conn, queues: ["default"]).size).to eq(1)
    end

    it "reads ready steps through the queue index and updates the claimed ones by id: no scan of the steps table" do
      use_templates(template("wide", Array.new(10) { |i| step("s#{i}") }))
      TaskerCore.create_tasks(Array.new(500) { |i| { name: "wide", queue: i.even? ? "a" : "b", priority: i % 5 } })
      conn.exec("ANALYZE tasker_workflow_steps")
      conn.exec("ANALYZE tasker_tasks")
      conn.transaction do
        expect(claim_v4(conn, queues: %w[a b], room: [30, 30], limit: 50, limited: { a: 1000 }).size).to eq(50)
        scans = conn.exec("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'tasker_workflow_steps'")
        expect(scans.first["seq_scan"]).to eq(0)
      end
    end

    it "defers a step refused for want of its handler without a lost attempt" do
      TaskerCore.create_task(name: "one")
      r = claim_v4(conn, queues: ["default"]).first
      moved = conn.exec("SELECT * FROM tasker_defer_steps($1::bigint[], $2::int[], $3::int)",
                        [PG_INT[[r["step_id"]]], PG_INT[[r["attempt"]]], 60_000]).to_a
      expect(moved).to eq([{ "step_id" => r["step_id"], "handler" => "SpecHandlers::Noop" }])
      s = conn.exec("SELECT state, lost_attempts, next_attempt_at > now() + interval '50 s' AS later " \
                    "FROM tasker_workflow_steps WHERE id = $1", [r["step_id"]]).first
      expect(s).to eq("state" => "pending", "lost_attempts" => 0, "later" => true)
    end
  end
end
