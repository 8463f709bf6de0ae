# frozen_string_literal: true

# Test handlers named by the spec templates, and helpers that drive the
# store's SQL functions the way the orchestration loop does.
module SpecHandlers
  class Noop; end
  class Other; end
end

module StoreHelpers
  def registry_with(*templates)
    TaskerCore::TaskTemplateRegistry.new.tap { |r| templates.each { |t| r.register(t) } }
  end

  def template(name, steps, **extra)
    TaskerCore::TaskTemplate.new({ "name" => name, "steps" => steps }.merge(extra.transform_keys(&:to_s)))
  end

  def step(name, deps = [], **extra)
    { "name" => name, "handler" => "SpecHandlers::Noop", "depends_on" => deps }.merge(extra.transform_keys(&:to_s))
  end

  def use_templates(*templates)
    TaskerCore.task_templates = registry_with(*templates)
  end

  def claim(conn, owner: "orch-1", limit: 100, lease_ms: 60_000)
    conn.exec("SELECT * FROM tasker_claim_steps($1, $2, $3)", [owner, limit, lease_ms])
  end

  # results: [{ step_id:, attempt:, success: true, output: {}, error: nil, retryable: true, retry_after_ms: nil }]
  def apply(conn, results)
    conn.exec(<<~SQL, [
      SELECT * FROM tasker_apply_results($1::bigint[], $2::int[], $3::boolean[], $4::bytea[], $5::bytea[],
                                         $6::boolean[], $7::int[])
    SQL
      results.map { |r| r[:step_id] }, results.map { |r| r[:attempt] },
      results.map { |r| r.fetch(:success, true) },
      results.map { |r| r.key?(:output) ? r[:output] && TaskerCore::Codec.pack(r[:output]) : TaskerCore::Codec.pack({}) },
      results.map { |r| r[:error] && TaskerCore::Codec.pack(r[:error]) },
      results.map { |r| r.fetch(:retryable, true) }, results.map { |r| r[:retry_after_ms] }
    ]).first
  end

  def succeed(conn, claimed, output: ->(row) { { "from" => row["step_name"] } })
    apply(conn, claimed.map { |r| { step_id: r["step_id"], attempt: r["attempt"], output: output.call(r) } })
  end

  def fail_steps(conn, claimed, retryable: true, retry_after_ms: nil)
    apply(conn, claimed.map do |r|
      { step_id: r["step_id"], attempt: r["attempt"], success: false, output: nil, retryable: retryable,
        retry_after_ms: retry_after_ms, error: { "class" => "RuntimeError", "message" => "boom" } }
    end)
  end

  # Claims and completes until nothing is ready; returns the claimed rows in order.
  def run_to_completion(conn)
    all = []
    loop do
      rows = claim(conn)
      break if rows.empty?

      all.concat(rows)
      succeed(conn, rows)
    end
    all
  end

  def step_row(conn, task_id, name)
    conn.exec("SELECT * FROM tasker_workflow_steps WHERE task_id = $1 AND name = $2", [task_id, name]).first
  end

  def task_state(conn, task_id)
    conn.exec("SELECT state FROM tasker_tasks WHERE id = $1", [task_id]).first["state"]
  end
end

RSpec.configure { |c| c.include StoreHelpers }
