# frozen_string_literal: true

RSpec.describe "TaskerCore task API", :db do
  let(:conn) { connect }

  before do
    use_templates(
      template("linear", [step("a"), step("b", ["a"]), step("c", ["b"])]),
      template("diamond", [step("top"), step("left", ["top"]), step("right", ["top"]), step("bottom", %w[left right])]),
      template("typed", [step("a")], context_schema: { "type" => "object", "required" => ["order_id"],
                                                       "properties" => { "order_id" => { "type" => "integer" } } }),
      template("linear", [step("only")], version: "0.2.0")
    )
  end

  def edges(task_id)
    conn.exec(<<~SQL, [task_id]).map { |r| [r["f"], r["t"]] }.sort
      SELECT f.name AS f, t.name AS t FROM tasker_workflow_step_edges e
        JOIN tasker_workflow_steps f ON f.id = e.from_step_id JOIN tasker_workflow_steps t ON t.id = e.to_step_id
       WHERE f.task_id = $1
    SQL
  end

  def parents(task_id)
    conn.exec("SELECT name, pending_parents FROM tasker_workflow_steps WHERE task_id = $1", [task_id])
        .to_h { |r| [r["name"], r["pending_parents"]] }
  end

  it "creates a linear task with its steps and edges; only the task logs its creation" do
    id = TaskerCore.create_task(name: "linear", version: "0.1.0", context: { "x" => 1 })
    expect(parents(id)).to eq("a" => 0, "b" => 1, "c" => 1)
    expect(edges(id)).to eq([%w[a b], %w[b c]])
    t = TaskerCore.task(id)
    expect(t).to include(status: "pending", name: "linear", namespace: "default", version: "0.1.0",
                         context: { "x" => 1 })
    expect(t[:steps].map { |s| [s[:name], s[:state], s[:attempts]] })
      .to eq([["a", "pending", 0], ["b", "pending", 0], ["c", "pending", 0]])
    expect(t[:created_at]).to be_a(Time)
    expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE task_id = $1", [id])
               .first["n"]).to eq(0)
    expect(conn.exec("SELECT reason FROM tasker_task_transitions WHERE task_id = $1", [id]).map(&:values))
      .to eq([["created"]])
  end

  it "uses the highest version when none is given" do
    id = TaskerCore.create_task(name: "linear")
    expect(TaskerCore.task(id)).to include(version: "0.2.0")
    expect(TaskerCore.task(id)[:steps].map { |s| s[:name] }).to eq(["only"])
  end

  it "creates a diamond with two parents on the join" do
    id = TaskerCore.create_task(name: "diamond")
    expect(parents(id)).to eq("top" => 0, "left" => 1, "right" => 1, "bottom" => 2)
    expect(edges(id)).to eq([%w[left bottom], %w[right bottom], %w[top left], %w[top right]])
  end

  it "creates a fan-out/fan-in of 50" do
    use_templates(template("fan", [step("start"), *Array.new(50) { |i| step("w#{i}", ["start"]) },
                                   step("join", Array.new(50) { |i| "w#{i}" })]))
    id = TaskerCore.create_task(name: "fan")
    p = parents(id)
    expect(p.size).to eq(52)
    expect(p["join"]).to eq(50)
    expect(p.values_at(*Array.new(50) { |i| "w#{i}" })).to all(eq(1))
    expect(edges(id).size).to eq(100)
  end

  it "returns the existing task for the same identity key, also under concurrency" do
    ids = Array.new(4) { Thread.new { TaskerCore.create_task(name: "diamond", identity_key: "order-9") } }.map(&:value)
    expect(ids.uniq.size).to eq(1)
    expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(1)
    expect(TaskerCore.create_task(name: "diamond", identity_key: "order-10")).not_to eq(ids.first)
  end

  it "validates the context against the template's schema, naming the path" do
    expect { TaskerCore.create_task(name: "typed", context: { "order_id" => "x" }) }
      .to raise_error(TaskerCore::ValidationError, %r{/order_id})
    expect { TaskerCore.create_task(name: "typed", context: {}) }
      .to raise_error(TaskerCore::ValidationError, /order_id/)
    expect(TaskerCore.create_task(name: "typed", context: { "order_id" => 3 })).to be_a(Integer)
    expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(1)
  end

  describe "create_tasks" do
    it "creates many tasks of several templates in one call, ids in the order given" do
      ids = TaskerCore.create_tasks([{ name: "diamond", context: { "i" => 0 } },
                                     { name: "linear", version: "0.1.0", context: { "i" => 1 } },
                                     { name: "diamond", context: { "i" => 2 } }])
      expect(ids.size).to eq(3)
      expect(ids.uniq.size).to eq(3)
      expect(ids.map { |id| TaskerCore.task(id)[:context] }).to eq([{ "i" => 0 }, { "i" => 1 }, { "i" => 2 }])
      expect(parents(ids[0])).to eq("top" => 0, "left" => 1, "right" => 1, "bottom" => 2)
      expect(parents(ids[2])).to eq("top" => 0, "left" => 1, "right" => 1, "bottom" => 2)
      expect(parents(ids[1])).to eq("a" => 0, "b" => 1, "c" => 1)
      expect(edges(ids[0])).to eq([%w[left bottom], %w[right bottom], %w[top left], %w[top right]])
      expect(edges(ids[2])).to eq(edges(ids[0]))
      expect(edges(ids[1])).to eq([%w[a b], %w[b c]])
      expect(TaskerCore.task(ids[1])).to include(status: "pending", version: "0.1.0")
      history = conn.exec(<<~SQL, [ids]).first
        SELECT (SELECT count(*) FROM tasker_workflow_step_transitions WHERE task_id = ANY ($1::bigint[])) AS steps,
               (SELECT count(*) FROM tasker_task_transitions WHERE task_id = ANY ($1::bigint[])) AS tasks
      SQL
      expect(history).to eq("steps" => 0, "tasks" => 3)
      expect(TaskerCore.create_tasks([])).to eq([])
    end

    it "honours identity keys: existing tasks, repeats within the call, and concurrent calls" do
      first = TaskerCore.create_task(name: "diamond", identity_key: "k1")
      ids = TaskerCore.create_tasks([{ name: "diamond", identity_key: "k1" }, { name: "diamond", identity_key: "k2" },
                                     { name: "diamond" }, { name: "diamond", identity_key: "k2" },
                                     { name: "diamond" }])
      expect(ids[0]).to eq(first)
      expect(ids[3]).to eq(ids[1])
      expect(ids.uniq.size).to eq(4)
      expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(4)
      expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps").first["n"]).to eq(16)

      keys = Array.new(20) { |i| "c#{i}" }
      lists = Array.new(4) do |t|
        Thread.new do
          TaskerCore.create_tasks((t.even? ? keys : keys.reverse).map { |k| { name: "linear", identity_key: k } })
        end
      end.map(&:value)
      by_key = lists.first.zip(keys).to_h { |id, k| [k, id] }
      lists.each_with_index do |l, t|
        expect(l.zip(t.even? ? keys : keys.reverse).to_h { |id, k| [k, id] }).to eq(by_key)
      end
      expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks WHERE identity_key LIKE 'c%'").first["n"]).to eq(20)
    end

    it "checks every context before writing anything: schema, depth and size" do
      TaskerCore.configure(overrides: { "zeromq" => { "max_context_bytes" => 1000, "max_payload_depth" => 3 } })
      good = { name: "typed", context: { "order_id" => 1 } }
      expect { TaskerCore.create_tasks([good, { name: "typed", context: { "order_id" => "x" } }]) }
        .to raise_error(TaskerCore::ValidationError, %r{/order_id})
      expect { TaskerCore.create_tasks([good, { name: "linear", context: { "a" => { "b" => { "c" => [] } } } }]) }
        .to raise_error(TaskerCore::PayloadTooDeepError, /nests 4 levels .*max_payload_depth 3/)
      expect { TaskerCore.create_tasks([good, { name: "linear", context: { "s" => "x" * 1000 } }]) }
        .to raise_error(TaskerCore::PayloadTooLargeError, /over zeromq.max_context_bytes 1000/)
      expect { TaskerCore.create_tasks([good, { name: "nope" }]) }
        .to raise_error(TaskerCore::ConfigurationError, %r{default/nope})
      expect { TaskerCore.create_tasks([good.merge(colour: 1)]) }.to raise_error(ArgumentError, /colour/)
      expect(conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(0)
    end

    it "creates tasks that run to completion" do
      ids = TaskerCore.create_tasks(Array.new(5) { |i| { name: "linear", version: "0.1.0", context: { "i" => i } } })
      run_to_completion(conn)
      expect(ids.map { |id| TaskerCore.task(id)[:status] }).to all(eq("complete"))
    end
  end

  it "raises ConfigurationError for an unknown template" do
    expect { TaskerCore.create_task(name: "nope") }.to raise_error(TaskerCore::ConfigurationError, %r{default/nope})
  end

  it "waits for a task to finish and times out when it does not" do
    id = TaskerCore.create_task(name: "linear", version: "0.1.0")
    expect { TaskerCore.wait_for(id, timeout: 0.1) }.to raise_error(TaskerCore::WaitTimeoutError, /pending/)
    runner = Thread.new { run_to_completion(connect) }
    result = TaskerCore.wait_for(id, timeout: 30)
    runner.join
    expect(result[:status]).to eq("complete")
    expect(result[:steps].map { |s| s[:output] }).to eq([{ "from" => "a" }, { "from" => "b" }, { "from" => "c" }])
    expect(result[:steps].map { |s| s[:attempts] }).to all(eq(1))
  end

  it "cancels a task and its unfinished steps" do
    id = TaskerCore.create_task(name: "linear", version: "0.1.0")
    claim(conn)
    expect(TaskerCore.cancel_task(id)).to be(true)
    expect(TaskerCore.task(id)[:steps].map { |s| s[:state] }).to all(eq("cancelled"))
    expect(TaskerCore.wait_for(id, timeout: 5)[:status]).to eq("cancelled")
    expect(TaskerCore.cancel_task(id)).to be(false)
    expect(claim(conn)).to eq([])
  end

  it "retries a failed step: error -> pending with failures reset, and the task resumes" do
    use_templates(template("once", [step("s", [], retry: { "max_attempts" => 1 }), step("t", ["s"])]))
    id = TaskerCore.create_task(name: "once")
    fail_steps(conn, claim(conn))
    expect(TaskerCore.task(id)[:status]).to eq("error")
    step_id = TaskerCore.task(id)[:steps].first[:id]
    expect(TaskerCore.retry_step(step_id)).to be(true)
    expect(TaskerCore.task(id)[:steps].first).to include(state: "pending", failures: 0)
    expect(TaskerCore.task(id)[:status]).to eq("in_progress")
    expect(TaskerCore.retry_step(step_id)).to be(false)
    run_to_completion(conn)
    expect(TaskerCore.task(id)[:status]).to eq("complete")
  end

  it "resolves a step by hand: it counts as done for dependents and the task" do
    id = TaskerCore.create_task(name: "linear", version: "0.1.0")
    a = claim(conn).first
    expect(TaskerCore.resolve_step(a["step_id"], output: { "manual" => true })).to be(true)
    expect(apply(conn, [{ step_id: a["step_id"], attempt: a["attempt"] }])).to eq("applied" => 0, "stale" => 1)
    b = claim(conn).first
    expect(b["step_name"]).to eq("b")
    expect(TaskerCore::Codec.unpack(b["dep_outputs"].first)).to eq("manual" => true)
    succeed(conn, [b])
    c = TaskerCore.task(id)[:steps].last
    expect(TaskerCore.resolve_step(c[:id], output: {})).to be(true)
    expect(TaskerCore.task(id)[:status]).to eq("complete")
    expect(TaskerCore.resolve_step(c[:id], output: {})).to be(false)
  end

  describe "payload limits where the context enters" do
    def nested(levels) = (levels - 1).times.reduce({ "leaf" => 1 }) { |acc, _| { "n" => acc } }

    def task_count = conn.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]

    it "refuses a context nested deeper than zeromq.max_payload_depth, naming the depth and the limit" do
      expect(TaskerCore::Payload.depth(nested(24))).to eq(24)
      expect(TaskerCore.create_task(name: "linear", context: nested(24))).to be_a(Integer)
      expect { TaskerCore.create_task(name: "linear", context: nested(25)) }
        .to raise_error(TaskerCore::PayloadTooDeepError,
                        /context of a default\/linear@0.2.0 task nests 25 levels .*over zeromq.max_payload_depth 24/)
      expect { TaskerCore.create_task(name: "linear", context: { "a" => [[nested(28)]] }) }
        .to raise_error(TaskerCore::PayloadTooDeepError, /nests 31 levels/) # what was accepted before
      expect { TaskerCore.create_task(name: "linear", context: nested(500)) }
        .to raise_error(TaskerCore::PayloadTooDeepError, /nests more than 32 levels/)
      cyclic = { "a" => [] }
      cyclic["a"] << cyclic
      expect { TaskerCore.create_task(name: "linear", context: cyclic) }.to raise_error(TaskerCore::PayloadTooDeepError)
      TaskerCore.configure(overrides: { "zeromq" => { "max_payload_depth" => 3 } })
      expect { TaskerCore.create_task(name: "linear", context: nested(4)) }
        .to raise_error(TaskerCore::PayloadTooDeepError, /nests 4 levels .*max_payload_depth 3/)
      expect(task_count).to eq(1)
    end

    it "refuses a context bigger packed than zeromq.max_context_bytes, naming the size and the limit" do
      TaskerCore.configure(overrides: { "zeromq" => { "max_context_bytes" => 1000 } })
      ok = { "s" => "x" * 900 }
      expect(TaskerCore.create_task(name: "linear", context: ok)).to be_a(Integer)
      big = { "s" => "x" * 1000 }
      size = TaskerCore::Codec.pack(big).bytesize
      expect { TaskerCore.create_task(name: "linear", context: big, identity_key: "big") }
        .to raise_error(TaskerCore::PayloadTooLargeError, /is #{size} bytes packed, over zeromq.max_context_bytes 1000/)
      expect(task_count).to eq(1)
    end

    it "refuses a template whose handler_config breaks the limits when it loads (ConfigurationError)" do
      expect { template("deep", [step("a", handler_config: nested(25))]) }
        .to raise_error(TaskerCore::ConfigurationError, /step "a": handler_config nests 25 levels/)
      TaskerCore.configure(overrides: { "zeromq" => { "max_context_bytes" => 100 } })
      expect { template("wide", [step("a", handler_config: { "s" => "x" * 200 })]) }
        .to raise_error(TaskerCore::ConfigurationError, /step "a": handler_config is \d+ bytes packed/)
    end
  end
end

