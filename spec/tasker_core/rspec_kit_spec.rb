# frozen_string_literal: true

require "tasker_core/rspec"
require_relative "../fixtures/durable_handlers"

module KitHandlers
  class Start
    def call(task, _seq, _step) = { "order" => task.context["order_id"] }
  end

  class Double
    def call(_task, seq, _step) = { "total" => seq["start"]["order"] * 2 }
  end

  class Declined < StandardError; end

  class Charge
    def call(_task, _seq, _step) = raise(TaskerCore::PermanentError, "card declined")
  end

  class Flaky
    def call(_task, _seq, step)
      raise TaskerCore::RetryableError.new("try again", retry_after: 60) if step.attempt < 3

      { "attempt" => step.attempt }
    end
  end

  class Explode
    def call(_task, _seq, _step) = raise(Declined, "no")
  end
end

RSpec.describe "tasker_core/rspec" do
  include TaskerCore::RSpec::Helpers

  # Leave no orchestrator running on the shared database for other spec files.
  after(:all) { TaskerCore::RSpec::Stack.shutdown! }

  # One cluster for the whole suite: the kit's stack uses the specs' database.
  around do |example|
    before = ENV["DATABASE_URL"]
    ENV["DATABASE_URL"] = DatabaseHelpers.migrated_url
    example.run
  ensure
    ENV["DATABASE_URL"] = before
  end

  before do
    use_templates(
      template("order", [step("start", handler: "KitHandlers::Start"), step("double", ["start"], handler: "KitHandlers::Double")]),
      template("charge", [step("start", handler: "KitHandlers::Start"), step("charge", ["start"], handler: "KitHandlers::Charge"),
                          step("ship", ["charge"], handler: "KitHandlers::Start")]),
      template("flaky", [step("flaky", handler: "KitHandlers::Flaky", retry: { "max_attempts" => 5 })]),
      template("explode", [step("boom", handler: "KitHandlers::Explode", retry: { "max_attempts" => 2 })]),
      template("echo", [step("a", handler: "DurableHandlers::Echo"), step("b", ["a"], handler: "DurableHandlers::Echo")]),
      template("side", [step("a", handler: "DurableHandlers::Echo", queue: "side")]),
      template("pay", [step("start", handler: "KitHandlers::Start", queue: "payments"),
                       step("double", ["start"], handler: "KitHandlers::Double", priority: 5)])
    )
  end

  describe "inline mode", :tasker_inline do
    it "runs a DAG in this process through the store's functions" do
      result = tasker_inline.run(name: "order", context: { "order_id" => 21 })
      expect(result.status).to eq("complete")
      expect(result).to have_step("double").in_state(:complete).with_output(total: 42)
      expect(result).to have_step(:start).with_output("order" => 21)
      expect(result.handler_calls).to eq(2)
      conn = connect
      expect(conn.exec("SELECT count(*) AS n FROM tasker_workflow_step_transitions WHERE task_id = $1 AND to_state = 'complete'",
                       [result.task_id]).first["n"]).to eq(2)
    end

    it "runs steps on any queue, and only that task's: other tasks' ready steps are left alone" do
      other = TaskerCore.create_task(name: "order", context: { "order_id" => 2 })
      result = tasker_inline.run(name: "pay", context: { "order_id" => 4 })
      expect(result.status).to eq("complete")
      expect(result).to have_step("double").in_state(:complete).with_output(total: 8)
      expect(TaskerCore.task(other)[:steps].map { |st| [st[:name], st[:state], st[:attempts]] })
        .to contain_exactly(["start", "pending", 0], ["double", "pending", 0])
    end

    it "stops at a permanent failure and never runs the dependents" do
      result = tasker_inline.run(name: "charge", context: { "order_id" => 1 })
      expect(result.status).to eq("error")
      expect(result).to fail_step("charge").with_error(TaskerCore::PermanentError, "card declined")
      expect(result).to have_step("ship").in_state(:pending)
      expect(result).not_to fail_step("start")
    end

    it "applies the retry rules without waiting out the backoff" do
      result = tasker_inline.run(name: "flaky")
      expect(result).to have_step("flaky").in_state(:complete).with_output("attempt" => 3)
      expect(result.step("flaky")[:attempts]).to eq(3)
      expect(result).to fail_step("flaky").with_error("TaskerCore::RetryableError")
    end

    it "gives up after max_attempts with the handler's error class" do
      result = tasker_inline.run(name: "explode")
      expect(result).to fail_step("boom").with_error(KitHandlers::Declined, /no/)
      expect(result.step("boom")[:attempts]).to eq(2)
    end

    it "calls one handler on a made-up step" do
      out = tasker_inline.call_handler(KitHandlers::Double, dependency_results: { "start" => { "order" => 5 } })
      expect(out).to eq("total" => 10)
    end

    it "explains a mismatch" do
      result = tasker_inline.run(name: "order", context: { "order_id" => 1 })
      matcher = have_step("double").in_state(:complete).with_output("total" => 3)
      expect(matcher.matches?(result)).to be(false)
      expect(matcher.failure_message).to include('with output {"total"=>3}', '{"total"=>2}')
      missing = have_step("nope")
      expect(missing.matches?(result)).to be(false)
      expect(missing.failure_message).to include("start, double")
    end
  end

  describe "a running stack", :tasker_stack do
    before(:all) do
      TaskerCore::RSpec::Stack.handler_paths = [File.expand_path("../fixtures/durable_handlers.rb", __dir__)]
    end

    it "runs a task through the orchestration loop and a worker process" do
      id = TaskerCore.create_task(name: "echo", context: { "n" => 7 })
      expect(id).to complete_within(30)
      expect(id).to have_step("b").in_state(:complete).with_output(hash_including("deps" => hash_including("a")))
      expect(TaskerCore.task(id)[:steps].map { |s| s[:output]["pid"] }).to all(eq(tasker_stack.worker_pid))
    end

    it "serves the queues the templates name, and those of create_task(queue:)" do
      id = TaskerCore.create_task(name: "side", context: { "n" => 2 })
      expect(id).to complete_within(30)
      id = TaskerCore.create_task(name: "echo", context: { "n" => 3 }, queue: "solo")
      expect(id).to complete_within(30)
      expect(tasker_stack.workers.map { |w| w["queues"] }).to all(include("solo", "side", "default"))
    end

    it "starts each example with empty tables" do
      expect(connect.exec("SELECT count(*) AS n FROM tasker_tasks").first["n"]).to eq(0)
      id = TaskerCore.create_task(name: "echo", context: { "n" => 1 })
      expect(id).to complete_within(30)
    end

    it "reports a task that does not complete in time" do
      matcher = complete_within(0.01)
      id = TaskerCore.create_task(name: "charge", context: { "order_id" => 1 })
      matcher.matches?(id) # races the worker: either still running or finished in error
      expect(matcher.failure_message).to match(/expected task #{id} to complete/)
    end
  end
end
