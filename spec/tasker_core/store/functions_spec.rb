# frozen_string_literal: true

require "open3"
require_relative "../../../bench/lib/plan_audit"

RSpec.describe "the store's SQL functions", :db do
  let(:conn) { connect }

  before do
    use_templates(
      template("linear", [step("a"), step("b", ["a"]), step("c", ["b"])]),
      template("diamond", [step("top"), step("left", ["top"]), step("right", ["top"]), step("bottom", %w[left right])]),
      template("flaky", [step("s", [], retry: { "max_attempts" => 3, "backoff_base_ms" => 1000,
                                                "backoff_cap_ms" => 1500, "jitter" => 0.2 }), step("after", ["s"])]),
      template("fragile", [step("s", [], retry: { "retryable" => false }), step("after", ["s"]), step("side")])
    )
  end

  it "claims ready steps with their context and dependency outputs, in DAG order" do
    id = TaskerCore.create_task(name: "diamond", context: { "order" => 7 })
    first = claim(conn)
    expect(first.map { |r| r["step_name"] }).to eq(["top"])
    row = first.first
    expect(row).to include("task_id" => id, "handler" => "SpecHandlers::Noop", "attempt" => 1, "dep_names" => [],
                           "dep_outputs" => [])
    expect(TaskerCore::Codec.unpack(row["context"])).to eq("order" => 7)
    expect(TaskerCore::Codec.unpack(row["handler_config"])).to eq({})
    expect(task_state(conn, id)).to eq("in_progress")
    expect(claim(conn)).to eq([]) # nothing else is ready until top completes

    succeed(conn, first)
    middle = claim(conn)
    expect(middle.map { |r| r["step_name"] }.sort).to eq(%w[left right])
    expect(middle.map { |r| r["dep_names"] }).to all(eq(["top"]))
    expect(TaskerCore::Codec.unpack(middle.first["dep_outputs"].first)).to eq("from" => "top")

    succeed(conn, middle.take(1))
    expect(claim(conn)).to eq([]) # bottom waits for both parents
    succeed(conn, middle.drop(1))
    bottom = claim(conn)
    expect(bottom.map { |r| r["step_name"] }).to eq(["bottom"])
    expect(bottom.first["dep_names"]).to eq(%w[left right])
    expect(bottom.first["dep_outputs"].map { |o| TaskerCore::Codec.unpack(o) })
      .to eq([{ "from" => "left" }, { "from" => "right" }])
    expect(succeed(conn, bottom)).to eq("applied" => 1, "stale" => 0)
    expect(task_state(conn, id)).to eq("complete")
  end

  it "never gives the same step to two connections claiming concurrently (SKIP LOCKED)" do
    ids = Array.new(20) { TaskerCore.create_task(name: "linear") }
    conns = Array.new(4) { connect }
    claimed = conns.each_with_index.map do |c, i|
      Thread.new { c.transaction { Array.new(5) { claim(c, owner: "o#{i}", limit: 3) }.flatten } }
    end.flat_map(&:value)
    step_ids = claimed.map { |r| r["step_id"] }
    expect(step_ids.size).to eq(20) # every task's first step, each once
    expect(step_ids.uniq.size).to eq(step_ids.size)
    expect(claimed.map { |r| r["task_id"] }.sort).to eq(ids.sort)
  end

  describe "tasker_claim_steps_v3 (claimed straight to in_progress)" do
    def claim_v2(conn, limit: 100, lease_ms: 60_000)
      conn.exec("SELECT * FROM tasker_claim_steps_v3($1, $2, $3, NULL, 0)", ["orch-2", limit, lease_ms])
    end

    def history(conn, step_id)
      conn.exec("SELECT from_state, to_state, attempt, owner, reason FROM tasker_workflow_step_transitions " \
                "WHERE step_id = $1 ORDER BY id", [step_id]).map(&:values)
    end

    it "returns what tasker_claim_steps returns, in flight at once with one transition per claim" do
      id = TaskerCore.create_task(name: "diamond", context: { "order" => 7 })
      rows = claim_v2(conn)
      expect(rows.map { |r| r["step_name"] }).to eq(["top"])
      expect(rows.first).to include("task_id" => id, "attempt" => 1, "dep_names" => [], "dep_outputs" => [])
      expect(TaskerCore::Codec.unpack(rows.first["context"])).to eq("order" => 7)
      expect(step_row(conn, id, "top")).to include("state" => "in_progress", "claimed_by" => "orch-2")
      expect(step_row(conn, id, "top")["claim_deadline"]).not_to be_nil
      expect(task_state(conn, id)).to eq("in_progress")
      top = rows.first["step_id"]
      expect(history(conn, top)).to eq([["pending", "in_progress", 1, "orch-2", "claimed"]])
      # an older orchestrator's mark_dispatched finds nothing enqueued and changes nothing
      expect(conn.exec("SELECT tasker_mark_dispatched($1::bigint[], $2::int[]) AS n", [[top], [1]]).first["n"]).to eq(0)
      expect(claim_v2(conn)).to eq([])

      expect(succeed(conn, rows)).to eq("applied" => 1, "stale" => 0)
      expect(history(conn, top).map(&:last)).to eq(%w[claimed result]) # one row per claim, one per result
      middle = claim_v2(conn)
      expect(middle.map { |r| r["step_name"] }.sort).to eq(%w[left right])
      expect(middle.map { |r| r["dep_names"] }).to all(eq(["top"]))
      succeed(conn, middle)
      succeed(conn, claim_v2(conn))
      expect(task_state(conn, id)).to eq("complete")
    end

    it "releases, loses and expires its claims as the version 1 claim's, late results stale" do
      id = TaskerCore.create_task(name: "flaky")
      first = claim_v2(conn).first
      expect(conn.exec("SELECT tasker_release_steps($1::bigint[], $2::int[]) AS n",
                       [[first["step_id"]], [first["attempt"]]]).first["n"]).to eq(1)
      expect(step_row(conn, id, "s")).to include("state" => "pending", "failures" => 0, "claimed_by" => nil)
      second = claim_v2(conn).first
      expect(second["attempt"]).to eq(2)
      expect(apply(conn, [{ step_id: first["step_id"], attempt: 1 }])).to eq("applied" => 0, "stale" => 1)
      expect(release_lost(conn, [second])).to eq("released" => 1, "failed" => 0)
      third = claim_v2(conn)
      expire(conn, third)
      expect(conn.exec("SELECT tasker_requeue_expired(10, 5) AS n").first["n"]).to eq(1)
      expect(step_row(conn, id, "s")).to include("state" => "pending", "lost_attempts" => 2, "failures" => 0)
      fourth = claim_v2(conn)
      expect(fail_steps(conn, fourth)).to eq("applied" => 1, "stale" => 0)
      expect(step_row(conn, id, "s")).to include("state" => "pending", "failures" => 1)
      expect(history(conn, first["step_id"]).map { |h| h[1] })
        .to eq(%w[in_progress pending in_progress pending in_progress pending in_progress pending])
    end

    it "claims only through the function: other direct changes are still refused (TK001)" do
      id = TaskerCore.create_task(name: "linear")
      succeed(conn, claim_v2(conn))
      a = step_row(conn, id, "a")["id"]
      expect { conn.exec("UPDATE tasker_workflow_steps SET state = 'in_progress' WHERE id = $1", [a]) }
        .to raise_error(TaskerCore::StoreError) { |e| expect(e.sqlstate).to eq("TK001") }
    end
  end

  it "marks claimed steps dispatched only for the current attempt" do
    TaskerCore.create_task(name: "linear")
    row = claim(conn).first
    n = conn.exec("SELECT tasker_mark_dispatched($1::bigint[], $2::int[]) AS n",
                  [[row["step_id"], row["step_id"]], [row["attempt"] + 1, row["attempt"]]]).first["n"]
    expect(n).to eq(1)
    expect(conn.exec("SELECT state FROM tasker_workflow_steps WHERE id = $1", [row["step_id"]]).first["state"])
      .to eq("in_progress")
  end

  it "retries a failure after the recorded backoff, then errors the task when attempts run out" do
    id = TaskerCore.create_task(name: "flaky")
    row = claim(conn).first
    expect(fail_steps(conn, [row])).to eq("applied" => 1, "stale" => 0)
    s = conn.exec(<<~SQL, [row["step_id"]]).first
      SELECT state, failures, extract(epoch FROM next_attempt_at - last_failure_at) * 1000 AS delay_ms
        FROM tasker_workflow_steps WHERE id = $1
    SQL
    expect(s["state"]).to eq("pending")
    expect(s["failures"]).to eq(1)
    expect(s["delay_ms"].to_f).to be_between(800, 1000) # base 1000, jitter 0.2
    expect(claim(conn)).to eq([]) # backoff not elapsed

    conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() WHERE id = $1", [row["step_id"]])
    second = claim(conn).first
    expect(second["attempt"]).to eq(2)
    fail_steps(conn, [second])
    delay = conn.exec("SELECT extract(epoch FROM next_attempt_at - last_failure_at) * 1000 AS d " \
                      "FROM tasker_workflow_steps WHERE id = $1", [row["step_id"]]).first["d"].to_f
    expect(delay).to be_between(1200, 1500) # 2000 capped at 1500, jitter 0.2

    conn.exec("UPDATE tasker_workflow_steps SET next_attempt_at = now() WHERE id = $1", [row["step_id"]])
    third = claim(conn).first
    fail_steps(conn, [third])
    expect(step_row(conn, id, "s")).to include("state" => "error", "failures" => 3)
    expect(task_state(conn, id)).to eq("error")
    expect(step_row(conn, id, "after")["state"]).to eq("pending")
    expect(TaskerCore.task(id)[:steps].first[:error]).to eq("class" => "RuntimeError", "message" => "boom")
  end

  it "lets a handler's retry_after win over the backoff" do
    TaskerCore.create_task(name: "flaky")
    row = claim(conn).first
    fail_steps(conn, [row], retry_after_ms: 5000)
    delay = conn.exec("SELECT extract(epoch FROM next_attempt_at - last_failure_at) * 1000 AS d " \
                      "FROM tasker_workflow_steps WHERE id = $1", [row["step_id"]]).first["d"].to_f
    expect(delay).to be_within(1).of(5000)
  end

  it "fails the task on a permanent failure and never runs the dependents or other branches" do
    id = TaskerCore.create_task(name: "fragile")
    rows = claim(conn)
    s = rows.find { |r| r["step_name"] == "s" }
    fail_steps(conn, [s], retryable: true) # the step's policy says not retryable
    expect(task_state(conn, id)).to eq("error")
    side = rows.find { |r| r["step_name"] == "side" }
    succeed(conn, [side]) # an in-flight sibling still lands
    expect(claim(conn)).to eq([])
    expect(step_row(conn, id, "after")["state"]).to eq("pending")
    expect(task_state(conn, id)).to eq("error")
  end

  it "treats a handler's non-retryable error as permanent" do
    id = TaskerCore.create_task(name: "flaky")
    fail_steps(conn, claim(conn), retryable: false)
    expect(step_row(conn, id, "s")["state"]).to eq("error")
  end

  it "reports duplicate and stale results and changes nothing for them" do
    id = TaskerCore.create_task(name: "linear")
    row = claim(conn).first
    dup = { step_id: row["step_id"], attempt: row["attempt"], output: { "n" => 1 } }
    expect(apply(conn, [dup, dup.merge(output: { "n" => 2 })])).to eq("applied" => 1, "stale" => 1)
    expect(apply(conn, [dup.merge(output: { "n" => 3 })])).to eq("applied" => 0, "stale" => 1)
    old = { step_id: row["step_id"], attempt: row["attempt"] - 1, output: { "n" => 4 } }
    expect(apply(conn, [old])).to eq("applied" => 0, "stale" => 1)
    expect(TaskerCore::Codec.unpack(step_row(conn, id, "a")["output"])).to eq("n" => 1)
    completes = conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE step_id = $1 " \
                          "AND to_state = 'complete'", [row["step_id"]]).first["n"]
    expect(completes).to eq(1)
  end

  it "ignores a late result of an attempt that was released and claimed again" do
    id = TaskerCore.create_task(name: "linear")
    first = claim(conn).first
    released = conn.exec("SELECT tasker_release_steps($1::bigint[], $2::int[]) AS n",
                         [[first["step_id"]], [first["attempt"]]]).first["n"]
    expect(released).to eq(1)
    expect(step_row(conn, id, "a")).to include("state" => "pending", "failures" => 0)
    second = claim(conn).first
    expect(second["attempt"]).to eq(first["attempt"] + 1)
    expect(apply(conn, [{ step_id: first["step_id"], attempt: first["attempt"] }])).to eq("applied" => 0, "stale" => 1)
    expect(step_row(conn, id, "a")["state"]).to eq("enqueued")
  end

  def release_lost(conn, rows, max_lost: 2)
    conn.exec("SELECT * FROM tasker_release_lost_steps($1::bigint[], $2::int[], $3)",
              [rows.map { |r| r["step_id"] }, rows.map { |r| r["attempt"] }, max_lost]).first
  end

  def expire(conn, rows)
    conn.exec("UPDATE tasker_workflow_steps SET claim_deadline = now() - interval '1 second' WHERE id = ANY ($1::bigint[])",
              [rows.map { |r| r["step_id"] }])
  end

  def step_reasons(conn, step_id)
    conn.exec("SELECT reason FROM tasker_workflow_step_transitions WHERE step_id = $1 ORDER BY id", [step_id])
        .map { |r| r["reason"] }
  end

  it "sends a lost step back to pending at once without spending its retry budget" do
    id = TaskerCore.create_task(name: "fragile") # s: retry: { retryable: false }
    rows = claim(conn)
    s = rows.find { |r| r["step_name"] == "s" }
    conn.exec("SELECT tasker_mark_dispatched($1::bigint[], $2::int[])", [[s["step_id"]], [s["attempt"]]])
    expect(release_lost(conn, [s, s])).to eq("released" => 1, "failed" => 0) # a duplicate pair counts once
    row = step_row(conn, id, "s")
    expect(row).to include("state" => "pending", "failures" => 0, "lost_attempts" => 1, "claimed_by" => nil,
                           "claim_deadline" => nil, "last_error" => nil)
    expect(step_reasons(conn, s["step_id"]).last).to eq("lost")
    again = claim(conn).find { |r| r["step_name"] == "s" }
    expect(again["attempt"]).to eq(s["attempt"] + 1)
    succeed(conn, [again, rows.find { |r| r["step_name"] == "side" }])
    succeed(conn, claim(conn))
    expect(task_state(conn, id)).to eq("complete")
  end

  it "fails a step lost once more than max_lost with StepLostError and finalizes its task" do
    id = TaskerCore.create_task(name: "flaky") # retryable, max_attempts 3: the budget is not what stops it
    3.times do |i|
      row = claim(conn).first
      expect(row["step_name"]).to eq("s")
      expected = i < 2 ? { "released" => 1, "failed" => 0 } : { "released" => 0, "failed" => 1 }
      expect(release_lost(conn, [row], max_lost: 2)).to eq(expected)
    end
    s = step_row(conn, id, "s")
    expect(s).to include("state" => "error", "lost_attempts" => 3, "attempts" => 3)
    expect(s["finished_at"]).not_to be_nil
    expect(TaskerCore::Codec.unpack(s["last_error"])).to eq(
      "class" => "TaskerCore::StepLostError",
      "message" => "dispatched 3 times without a result: its worker or orchestrator was lost each time",
      "backtrace" => [], "retryable" => false, "retry_after" => nil
    )
    expect(step_reasons(conn, s["id"]).last).to eq("lost_too_often")
    expect(task_state(conn, id)).to eq("error")
    expect(claim(conn)).to eq([])
    expect(TaskerCore.task(id)[:status]).to eq("error")

    # retry_step: the losses are counted afresh
    expect(TaskerCore.retry_step(s["id"])).to be(true)
    expect(step_row(conn, id, "s")).to include("state" => "pending", "failures" => 0, "lost_attempts" => 0)
    expect(task_state(conn, id)).to eq("in_progress")
  end

  it "changes nothing for a stale attempt or a step no longer in flight" do
    id = TaskerCore.create_task(name: "linear")
    first = claim(conn).first
    release_lost(conn, [first])
    second = claim(conn).first
    before = step_row(conn, id, "a")
    expect(release_lost(conn, [first])).to eq("released" => 0, "failed" => 0) # the old attempt
    expect(step_row(conn, id, "a")).to eq(before)
    succeed(conn, [second])
    expect(release_lost(conn, [second])).to eq("released" => 0, "failed" => 0) # finished
    expect(step_row(conn, id, "a")).to include("state" => "complete", "lost_attempts" => 1)
    expect(conn.exec("SELECT * FROM tasker_release_lost_steps('{}'::bigint[], '{}'::int[], 5)").first)
      .to eq("released" => 0, "failed" => 0)
  end

  it "requeues a claim past its deadline as a lost attempt, not a StepTimeoutError failure" do
    id = TaskerCore.create_task(name: "fragile") # not retryable: a failure would end it
    rows = claim(conn, lease_ms: 0)
    expire(conn, rows.select { |r| r["step_name"] == "s" })
    expect(conn.exec("SELECT tasker_requeue_expired(10, 1) AS n").first["n"]).to eq(1)
    s = step_row(conn, id, "s")
    expect(s).to include("state" => "pending", "failures" => 0, "lost_attempts" => 1, "claimed_by" => nil,
                         "last_error" => nil)
    expect(task_state(conn, id)).to eq("in_progress")
    expect(conn.exec("SELECT tasker_requeue_expired(10, 1) AS n").first["n"]).to eq(0)

    again = claim(conn, lease_ms: 0).select { |r| r["step_name"] == "s" }
    expire(conn, again)
    expect(conn.exec("SELECT tasker_requeue_expired(10, 1) AS n").first["n"]).to eq(1)
    expect(TaskerCore::Codec.unpack(step_row(conn, id, "s")["last_error"])["class"]).to eq("TaskerCore::StepLostError")
    expect(task_state(conn, id)).to eq("error")
  end

  it "keeps the one-argument tasker_requeue_expired for older orchestrators, with 5 losses allowed" do
    id = TaskerCore.create_task(name: "fragile")
    6.times do |i|
      rows = claim(conn, lease_ms: 0).select { |r| r["step_name"] == "s" }
      expect(rows.size).to eq(1)
      expire(conn, rows)
      expect(conn.exec("SELECT tasker_requeue_expired(10) AS n").first["n"]).to eq(1)
      expect(step_row(conn, id, "s")["state"]).to eq(i < 5 ? "pending" : "error")
    end
    s = step_row(conn, id, "s")
    expect(s).to include("lost_attempts" => 6, "failures" => 1)
    expect(TaskerCore::Codec.unpack(s["last_error"])["class"]).to eq("TaskerCore::StepLostError")
  end

  describe "tasker_claim_steps_v2 (suspect steps, db/migrate/0008)" do
    def claim_v2(limit:, suspects:, lost: 2)
      conn.exec("SELECT * FROM tasker_claim_steps_v2('orch-1', $1, 60000, $2, $3)", [limit, lost, suspects]).to_a
    end

    # Three ready steps; the one of the second task lost twice.
    def three_ready
      ids = Array.new(3) { TaskerCore.create_task(name: "linear") }
      conn.exec("UPDATE tasker_workflow_steps SET lost_attempts = 2 WHERE task_id = $1 AND name = 'a'", [ids[1]])
      ids
    end

    it "returns lost_attempts and claims suspects only up to their own budget, within the limit" do
      ids = three_ready
      expect(claim_v2(limit: 10, suspects: 0).map { |r| [r["task_id"], r["lost_attempts"]] })
        .to eq([[ids[0], 0], [ids[2], 0]])
      rows = claim_v2(limit: 10, suspects: 1)
      expect(rows.map { |r| [r["task_id"], r["step_name"], r["attempt"], r["lost_attempts"]] }).to eq([[ids[1], "a", 1, 2]])
      expect(rows.first.keys).to eq(%w[step_id task_id step_name handler handler_config attempt timeout_ms context
                                       dep_names dep_outputs lost_attempts])
      expect(step_reasons(conn, rows.first["step_id"])).to eq(%w[claimed]) # history starts at the claim (0009)
      expect(step_row(conn, ids[1], "a")["state"]).to eq("enqueued")
    end

    it "has the loop's version 3 (db/migrate/0009): the same budget and columns, straight to in_progress" do
      ids = three_ready
      rows = conn.exec("SELECT * FROM tasker_claim_steps_v3('orch-1', 10, 60000, 2, 1)").to_a
      expect(rows.map { |r| [r["task_id"], r["lost_attempts"]] }).to eq([[ids[0], 0], [ids[1], 2], [ids[2], 0]])
      expect(rows.first.keys).to eq(%w[step_id task_id step_name handler handler_config attempt timeout_ms context
                                       dep_names dep_outputs lost_attempts])
      expect(ids.map { |id| step_row(conn, id, "a")["state"] }).to all(eq("in_progress"))
    end

    it "updates the steps it claims by id, not by reading the whole steps table (db/migrate/0010)" do
      use_templates(template("wide", Array.new(10) { |i| step("s#{i}") }))
      TaskerCore.create_tasks(Array.new(500) { { name: "wide" } })
      conn.exec("ANALYZE tasker_workflow_steps")
      conn.exec("ANALYZE tasker_tasks")
      conn.transaction do
        rows = conn.exec("SELECT * FROM tasker_claim_steps_v3('orch-1', 50, 60000, 2, 1)").to_a
        expect(rows.size).to eq(50)
        scans = conn.exec("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'tasker_workflow_steps'")
        expect(scans.first["seq_scan"]).to eq(0)
      end
    end

    it "reads no table whole in a claim and an apply, with plans made on emptied tables (db/migrate/0014, 0015)" do
      use_templates(template("fan", [step("a"), step("b"), step("c", %w[a b])]))
      # Emptied and vacuumed: the planner then takes the tables for empty.
      %w[tasker_workflow_step_edges tasker_workflow_steps tasker_tasks].each { |t| conn.exec("VACUUM ANALYZE #{t}") }
      session = connect # a new session: its plans are made below, on near-empty tables
      loop_claim = "SELECT * FROM tasker_claim_steps_v4('orch-1', 60000, 2, $1, $2, '{default}', ARRAY[$2::int], '{}', '{}')"
      expect(session.exec(loop_claim, [1, 50]).to_a).to be_empty # the choice of steps planned on no rows at all
      TaskerCore.create_tasks([{ name: "fan" }])
      2.times { succeed(session, session.exec(loop_claim, [1, 50]).to_a) }
      TaskerCore.create_tasks(Array.new(500) { { name: "fan" } })
      %w[tasker_workflow_steps tasker_tasks tasker_workflow_step_edges].each { |t| conn.exec("ANALYZE #{t}") }
      in_flight = session.exec(loop_claim, [0, 1000]).to_a # every a and b: 1,000 steps in flight
      expect(in_flight.size).to eq(1000)
      # pg_stat_xact_user_tables holds what the session has not yet flushed:
      # flush it, so that it counts the transaction below only.
      session.exec("SELECT pg_stat_force_next_flush()")
      session.exec("SELECT 1")
      session.transaction do
        done = in_flight.last(50) # the newest tasks': a task read by anything but its id would read the older ones
        expect(succeed(session, done)).to eq("applied" => 50, "stale" => 0)
        ready = session.exec(loop_claim, [1, 50]).to_a
        reads = session.exec("SELECT relname, seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname IN " \
                             "('tasker_workflow_steps', 'tasker_tasks', 'tasker_workflow_step_edges')")
                       .to_h { |r| [r["relname"], r] }
        expect(reads.transform_values { |r| r["seq_scan"] })
          .to eq("tasker_workflow_steps" => 0, "tasker_tasks" => 0, "tasker_workflow_step_edges" => 0)
        # By id: a few rows per step touched, not the 1,000 in flight nor the 1,000 edges.
        expect(reads.transform_values { |r| r["idx_tup_fetch"] })
          .to match("tasker_workflow_steps" => be < 500, "tasker_tasks" => be < 300, "tasker_workflow_step_edges" => be < 500)
        # a and b of the last 25 tasks done: their c steps, released by the apply, are what the claim finds
        expect(ready.map { |r| r["step_name"] }).to eq(["c"] * 25)
      end
      # Buffers per result in a larger apply: about the same, not growing with
      # the call's size (a table read once per result by the whole array would).
      blocks = lambda do
        session.exec("SELECT pg_stat_force_next_flush()")
        session.exec("SELECT 1")
        session.exec("SELECT sum(heap_blks_hit + coalesce(idx_blks_hit, 0))::bigint AS n FROM pg_statio_user_tables " \
                     "WHERE relname = 'tasker_workflow_steps'").first["n"]
      end
      before = blocks.call
      expect(succeed(session, in_flight.first(400))["applied"]).to eq(400)
      expect((blocks.call - before) / 400.0).to be < 60
    end

    it "does nothing per pair of rows in a claim or an apply, with plans made on emptied tables (db/migrate/0015)" do
      use_templates(template("fan", [step("a"), step("b"), step("c", %w[a b])]))
      %w[tasker_workflow_step_edges tasker_workflow_steps tasker_tasks].each { |t| conn.exec("VACUUM ANALYZE #{t}") }
      claim = lambda do |n, limited: false| # limited: the queue under a limit (never reached), rechecked under its lock
        limits = limited ? "'{default}', ARRAY[100000]" : "'{}', '{}'"
        "SELECT step_id, attempt FROM tasker_claim_steps_v4('orch-1', 60000, 2, 0, #{n}, '{default}', ARRAY[#{n}], #{limits})"
      end
      apply = lambda do |from|
        "SELECT * FROM tasker_apply_results((SELECT array_agg(step_id) FROM #{from}), (SELECT array_agg(attempt) FROM #{from}), " \
          "(SELECT array_agg(true) FROM #{from}), (SELECT array_agg('\\x80'::bytea) FROM #{from}), " \
          "(SELECT array_agg(NULL::bytea) FROM #{from}), (SELECT array_agg(true) FROM #{from}), " \
          "(SELECT array_agg(NULL::int) FROM #{from}));"
      end
      # One psql session, its plans made as the tables fill: auto_explain
      # then prints each statement's plan, with the rows and loops of every
      # node, as a NOTICE.
      plans = Open3.popen2e("psql", db_url, "-X", "-q", "-v", "ON_ERROR_STOP=1") do |stdin, out, _wait|
        say = lambda do |sql|
          stdin.puts(sql, "\\echo -- done --")
          stdin.flush
          lines = []
          while (line = out.gets) && line.chomp != "-- done --"
            lines << line
          end
          raise "psql: #{lines.join}" if line.nil? || lines.grep(/ERROR/).any?

          lines.join
        end
        # the choice of steps and the apply's update planned on no rows at all
        say.("#{claim.(50)}; CREATE TEMP TABLE nothing AS SELECT 1::bigint AS step_id, 1 AS attempt; #{apply.('nothing')}")
        TaskerCore.create_tasks([{ name: "fan" }])
        say.("CREATE TEMP TABLE first AS #{claim.(50, limited: true)}; #{apply.('first')}")
        TaskerCore.create_tasks(Array.new(500) { { name: "fan" } })
        say.("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; " \
             "SET auto_explain.log_analyze = on; SET auto_explain.log_timing = off; " \
             "SET auto_explain.log_level = notice; SET client_min_messages = notice; " \
             "CREATE TEMP TABLE big AS #{claim.(500)}; CREATE TEMP TABLE more AS #{claim.(500, limited: true)}; " \
             "CREATE TEMP TABLE done AS SELECT * FROM big LIMIT 400; #{apply.('done')}")
      end
      expect(plans).to include("Update on tasker_workflow_steps") # the claim's and the apply's plans were printed
      expect(PlanAudit.nodes(plans)).to be > 50 # and their nodes' rows and loops read
      # 500 steps claimed, 500 more in a limited queue with the first 500 in
      # flight, 400 applied: a set scanned again per row, or rows compared
      # pairwise and dropped, would count in the hundreds of thousands.
      expect(PlanAudit.findings(plans).map { |f| "#{f.what} (#{f.most} rows): #{f.query}" }).to eq([])
    end

    it "never JIT-compiles the hot path: generic plans' estimates would compile them on every call (db/migrate/0015)" do
      config = conn.exec("SELECT p.proname, c.setting FROM pg_proc p CROSS JOIN LATERAL unnest(p.proconfig) AS c(setting) " \
                         "WHERE p.proname IN ('tasker_claim_queued', 'tasker_apply_results', 'tasker_settle_tasks', " \
                         "'tasker_release_children')")
                   .group_by { |r| r["proname"] }.transform_values { |rs| rs.map { |r| r["setting"] } }
      expect(config.keys).to contain_exactly("tasker_claim_queued", "tasker_apply_results", "tasker_settle_tasks",
                                             "tasker_release_children")
      expect(config.values).to all(include("jit=off", "plan_cache_mode=force_generic_plan", "enable_seqscan=off"))
    end

    it "counts the suspects it claims in the limit" do
      ids = three_ready
      expect(claim_v2(limit: 2, suspects: 5).map { |r| r["task_id"] }).to eq([ids[0], ids[1]])
      expect(claim_v2(limit: 1, suspects: 5).map { |r| r["task_id"] }).to eq([ids[2]])
    end

    it "keeps tasker_claim_steps and its 10 columns for older orchestrators: every ready step alike" do
      ids = three_ready
      rows = claim(conn)
      expect(rows.map { |r| r["task_id"] }).to eq(ids)
      expect(rows.first.keys).to eq(%w[step_id task_id step_name handler handler_config attempt timeout_ms context
                                       dep_names dep_outputs])
    end
  end

  it "computes the claim order inline, with the values of version 11 in any time zone (db/migrate/0016)" do
    # A SQL function whose body is more volatile than it is declared runs
    # as a call of its own each time; inlined, its name leaves the plan.
    plan = conn.exec("EXPLAIN (VERBOSE) SELECT tasker_claim_order(s.next_attempt_at, s.priority) " \
                     "FROM tasker_workflow_steps s").map { |r| r["QUERY PLAN"] }.join("\n")
    expect(plan).to include("AT TIME ZONE")
    expect(plan).not_to include("tasker_claim_order")

    # Version 11's arithmetic against the function across DST changes,
    # priorities at both bounds.
    %w[UTC America/New_York Australia/Lord_Howe].each do |zone|
      conn.exec("SET TIME ZONE '#{zone}'")
      differ = conn.exec(<<~SQL).first["n"]
        SELECT count(*) AS n
          FROM generate_series(timestamptz '2026-03-07 00:00Z', '2026-04-07 00:00Z', interval '17 minutes') AS t(at)
         CROSS JOIN (VALUES (-100), (-1), (0), (7), (100)) AS p(priority)
         WHERE tasker_claim_order(t.at, p.priority) IS DISTINCT FROM t.at - p.priority * interval '1 second'
      SQL
      expect(differ).to eq(0), "#{differ} claim orders differ in #{zone}"
    end
  ensure
    conn.exec("RESET TIME ZONE")
  end

  it "refuses illegal state transitions with SQLSTATE TK001" do
    id = TaskerCore.create_task(name: "linear")
    run_to_completion(conn)
    expect { conn.exec("UPDATE tasker_workflow_steps SET state = 'pending' WHERE task_id = $1", [id]) }
      .to raise_error(TaskerCore::StoreError, /illegal workflow step transition complete -> pending/) { |e|
        expect(e.sqlstate).to eq("TK001")
      }
    expect { conn.exec("UPDATE tasker_tasks SET state = 'in_progress' WHERE id = $1", [id]) }
      .to raise_error(TaskerCore::StoreError, /illegal task transition complete -> in_progress/)
    expect { conn.exec("UPDATE tasker_tasks SET state = 'bogus' WHERE id = $1", [id]) }
      .to raise_error(TaskerCore::StoreError)
  end

  it "lets a legal state change through the guard, also from a direct UPDATE" do
    id = TaskerCore.create_task(name: "linear")
    conn.exec("UPDATE tasker_workflow_steps SET state = 'cancelled' WHERE task_id = $1", [id])
    conn.exec("UPDATE tasker_tasks SET state = 'cancelled' WHERE id = $1", [id])
    expect(conn.exec("SELECT DISTINCT state FROM tasker_workflow_steps WHERE task_id = $1", [id]).map { |r| r["state"] })
      .to eq(["cancelled"])
    expect(task_state(conn, id)).to eq("cancelled")
  end

  it "deletes a task's steps, edges and histories with the task (statement triggers, no foreign keys)" do
    gone = TaskerCore.create_task(name: "diamond")
    kept = TaskerCore.create_task(name: "linear")
    run_to_completion(conn)
    count = lambda do |task_id|
      conn.exec(<<~SQL, [task_id]).first.transform_values(&:to_i)
        SELECT (SELECT count(*) FROM tasker_workflow_steps WHERE task_id = $1) AS steps,
               (SELECT count(*) FROM tasker_workflow_step_edges e JOIN tasker_workflow_steps s ON s.id = e.to_step_id
                 WHERE s.task_id = $1) AS edges,
               (SELECT count(*) FROM tasker_workflow_step_transitions WHERE task_id = $1) AS step_history,
               (SELECT count(*) FROM tasker_task_transitions WHERE task_id = $1) AS task_history
      SQL
    end
    before_kept = count.call(kept)
    expect(count.call(gone).values).to all(be_positive)
    conn.exec("DELETE FROM tasker_tasks WHERE id = $1", [gone])
    expect(count.call(gone).values).to all(eq(0))
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_edges").first["n"]).to eq(before_kept["edges"])
    expect(count.call(kept)).to eq(before_kept)

    conn.exec("TRUNCATE tasker_tasks")
    expect(conn.exec(<<~SQL).first.values).to all(eq(0))
      SELECT (SELECT count(*) FROM tasker_workflow_steps) AS a, (SELECT count(*) FROM tasker_workflow_step_edges) AS b,
             (SELECT count(*) FROM tasker_workflow_step_transitions) AS c, (SELECT count(*) FROM tasker_task_transitions) AS d
    SQL
  end

  it "completes a fan-out/fan-in of 50 with every dependency output reaching the join" do
    use_templates(template("fan", [step("start"), *Array.new(50) { |i| step("w#{i}", ["start"]) },
                                   step("join", Array.new(50) { |i| "w#{i}" })]))
    id = TaskerCore.create_task(name: "fan")
    rows = run_to_completion(conn)
    join = rows.find { |r| r["step_name"] == "join" }
    expect(join["dep_names"].size).to eq(50)
    expect(join["dep_outputs"].map { |o| TaskerCore::Codec.unpack(o)["from"] }.sort).to eq(join["dep_names"].sort)
    expect(task_state(conn, id)).to eq("complete")
    expect(rows.size).to eq(52)
  end
end
