# frozen_string_literal: true

require "logger"
require "stringio"

RSpec.describe TaskerCore::Retention, :db do
  include StoreHelpers

  let(:conn) { connect }
  let(:week) { 7 * 86_400 }

  before do
    use_templates(template("chain", [step("a"), step("b", ["a"]), step("c", %w[a b])]))
  end

  def create(n) = Array.new(n) { TaskerCore.create_task(name: "chain") }

  def finish(ids)
    run_to_completion(conn)
    expect(ids.map { |id| task_state(conn, id) }.uniq).to eq(["complete"])
  end

  # Moves the tasks' finish (and creation) days back, as time would.
  def age(ids, days)
    conn.exec("UPDATE tasker_tasks SET finished_at = finished_at - make_interval(days => $2), " \
              "created_at = created_at - make_interval(days => $2) WHERE id = ANY($1::bigint[])", [ids, days])
  end

  # Rows in every table that belong to the tasks.
  def rows_of(ids)
    steps = "SELECT id FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])"
    {
      tasks: "SELECT count(*)::int AS n FROM tasker_tasks WHERE id = ANY($1::bigint[])",
      task_transitions: "SELECT count(*)::int AS n FROM tasker_task_transitions WHERE task_id = ANY($1::bigint[])",
      steps: "SELECT count(*)::int AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[])",
      step_transitions: "SELECT count(*)::int AS n FROM tasker_workflow_step_transitions WHERE step_id IN (#{steps})",
      edges: "SELECT count(*)::int AS n FROM tasker_workflow_step_edges WHERE to_step_id IN (#{steps}) " \
             "OR from_step_id IN (#{steps})"
    }.transform_values { |sql| conn.exec(sql, [ids]).first["n"] }
  end

  it "deletes exactly the finished tasks older than the cutoff, with their steps, edges and histories" do
    old_done = create(5)
    old_cancelled = create(2)
    finish(old_done)
    old_cancelled.each { |id| TaskerCore.cancel_task(id) }
    recent_done = create(2)
    finish(recent_done)
    old_unfinished = create(3) # pending, created long ago
    age(old_done + old_cancelled + old_unfinished, 30)
    age(recent_done, 2)

    expect(rows_of(old_done)).to include(tasks: 5, steps: 15, edges: 15)
    expect(rows_of(old_done).values).to all(be_positive)
    kept_before = rows_of(recent_done + old_unfinished)

    result = described_class.new(older_than: week, batch_size: 2).run(conn)

    expect(result.to_h).to eq(tasks: 7, steps: 21, batches: 4)
    expect(rows_of(old_done + old_cancelled).values).to all(eq(0))
    expect(rows_of(recent_done + old_unfinished)).to eq(kept_before)
    expect(kept_before[:tasks]).to eq(5)
    expect(described_class.new(older_than: week).run(conn).to_h).to eq(tasks: 0, steps: 0, batches: 1)
  end

  it "lets one cleaner run at a time: a second one finds the lock taken and deletes nothing" do
    ids = create(4)
    finish(ids)
    age(ids, 30)
    other = connect
    second_results = []
    remaining = []
    result = described_class.new(older_than: week, batch_size: 1).run(conn) do |progress|
      next unless progress.batches == 1

      remaining << rows_of(ids)[:tasks]
      second_results << described_class.new(older_than: week, batch_size: 1).run(other)
      remaining << rows_of(ids)[:tasks]
    end
    expect(second_results).to eq([nil])
    expect(remaining).to eq([3, 3])
    expect(result.tasks).to eq(4)
    # The lock is given back: the next run takes it.
    expect(described_class.new(older_than: week).run(other).to_h).to eq(tasks: 0, steps: 0, batches: 1)
  end

  it "refuses to run inside a transaction (each batch commits on its own)" do
    conn.transaction do
      expect { described_class.new(older_than: week).run(conn) }.to raise_error(ArgumentError, /outside a transaction/)
    end
  end

  describe TaskerCore::Retention::Sweeper do
    it "cleans up periodically on its own connection, logs what it deleted, and stops" do
      ids = create(3)
      finish(ids)
      age(ids, 30)
      log = StringIO.new
      sweeper = described_class.new(older_than: week, interval: 3600, url: db_url, logger: Logger.new(log)).start
      wait_until(timeout: 20, message: "the sweeper to delete the old tasks") { rows_of(ids)[:tasks].zero? }
      sweeper.stop
      expect(sweeper).not_to be_running
      expect(log.string).to include("tasker retention: deleted 3 finished task(s) and 9 step(s)")
    end

    it "is built from retention.* and is off when retention.finished_after is null" do
      config = TaskerCore::Config.load(env: "test", overrides: { retention: { finished_after: "36h", interval_s: 5 } })
      sweeper = described_class.from_config(config, url: db_url)
      expect(sweeper.instance_variable_get(:@retention).older_than).to eq(36 * 3600)
      off = TaskerCore::Config.load(env: "test", overrides: { retention: { finished_after: nil } })
      expect(described_class.from_config(off, url: db_url)).to be_nil
      expect { TaskerCore::Config.load(env: "test", overrides: { retention: { finished_after: 14 } }) }
        .to raise_error(TaskerCore::ConfigurationError, /retention.finished_after: expected a duration/)
    end
  end
end
