# frozen_string_literal: true

require "tasker_core/rspec"

RSpec.describe TaskerCore::Instrumentation do
  after { described_class.clear! }
  after(:all) { TaskerCore::RSpec::Stack.shutdown! }

  it "delivers events to plain subscribers, per event or for all, and isolates a raising one" do
    got = []
    all = []
    TaskerCore.subscribe(:task_created) { |p| got << p }
    TaskerCore.subscribe { |e, p| all << [e, p] }
    TaskerCore.subscribe(:task_created) { raise "bad subscriber" }
    described_class.instrument(:task_created, task_id: 1)
    described_class.instrument(:step_started, step_id: 2)
    expect(got).to eq([{ task_id: 1 }])
    expect(all).to eq([[:task_created, { task_id: 1 }], [:step_started, { step_id: 2 }]])
  end

  it "refuses unknown events and unsubscribes" do
    expect { TaskerCore.subscribe(:nope) {} }.to raise_error(ArgumentError, /unknown event/)
    got = []
    sub = TaskerCore.subscribe(:worker_lost) { |p| got << p }
    TaskerCore.unsubscribe(sub)
    described_class.instrument(:worker_lost, worker_id: "w")
    expect(got).to be_empty
    expect(described_class.listening?(:worker_lost)).to be(false)
  end

  it "emits worker_lost from receive_results in manual mode" do
    got = []
    TaskerCore.subscribe(:worker_lost) { |p| got << p }
    msg = { "type" => "worker_lost", "worker_id" => "w1", "reason" => "timeout", "in_flight" => [{}, {}] }
    described_class.observe_result(msg)
    expect(got).to eq([{ worker_id: "w1", reason: "timeout", in_flight: 2 }])
  end

  describe "from create_task and the handlers", :tasker_inline do
    around do |example|
      before = ENV["DATABASE_URL"]
      ENV["DATABASE_URL"] = DatabaseHelpers.migrated_url
      example.run
    ensure
      ENV["DATABASE_URL"] = before
    end

    it "emits task_created, step_started, step_completed and step_failed" do
      use_templates(template("inst", [step("ok", handler: "InstOk"), step("bad", ["ok"], handler: "InstBad",
                                                                          retry: { "retryable" => false })]))
      events = []
      TaskerCore.subscribe { |e, p| events << [e, p] }
      TaskerCore::RSpec::Inline.new.run(name: "inst")
      names = events.map(&:first)
      expect(names).to eq(%i[task_created step_started step_completed step_started step_failed])
      expect(events.last[1]).to include(step_name: "bad", error_class: "ArgumentError", error_message: "nope")
    end
  end
end

class InstOk
  def call(*) = {}
end

class InstBad
  def call(*) = raise(ArgumentError, "nope")
end
