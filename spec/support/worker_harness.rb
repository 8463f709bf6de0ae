# frozen_string_literal: true

require "logger"
require "stringio"

# A BatchStepExecutionOrchestrator against a ProtocolPeer (a stand-in
# orchestrator of real sockets), with a "Gated" handler that reports its
# step id on `started` and waits on `gate` until the spec releases it.
RSpec.shared_context "a worker against a protocol peer" do
  let(:peer) { ProtocolPeer.new }
  let(:log) { StringIO.new }
  let(:registry) { TaskerCore::HandlerRegistry.new }
  let(:worker_id) { "spec-#{Process.pid}-#{rand(1 << 30)}" }
  let(:gate) { Thread::Queue.new }     # gated handlers wait here until the spec releases them
  let(:started) { Thread::Queue.new }  # gated handlers report their step id here when they start

  before do
    gate_q = gate
    started_q = started
    registry.register("Gated", lambda { |_task, _sequence, step|
      started_q << step.id
      gate_q.pop
      { "released" => step.id }
    })
  end

  after do
    @worker&.stop(timeout: 2)
    peer.close
  end

  # Starts the worker on `on` (a ProtocolPeer) and waits until that peer
  # sees it live. CURVE is off unless options say otherwise.
  def start_worker(on: peer, **options)
    @worker = described_class.new(step_sub_endpoint: on.batch_endpoint, result_pub_endpoint: on.result_endpoint,
                                  max_workers: 4, handler_registry: registry, worker_id: worker_id, curve: nil,
                                  heartbeat_interval_ms: 50, logger: Logger.new(ENV["SPEC_LOG"] ? $stderr : log),
                                  **options).start
    on.wait_for_worker(worker_id)
    @worker
  end

  def step(id, handler, **extra)
    { step_id: id, task_id: 100 + id, step_name: "s#{id}", handler: handler, context: { "n" => id }, **extra }
  end

  def index_of(msg)
    peer.messages.index { |m| m.equal?(msg) }
  end
end
