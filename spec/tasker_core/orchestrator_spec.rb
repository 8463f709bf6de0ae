# frozen_string_literal: true

# TaskerCore::Orchestrator: the loop in this process, the public name for
# what TaskerCore::Internal::OrchestrationManager does.
RSpec.describe TaskerCore::Orchestrator do
  around do |example|
    TaskerCore.configure(overrides: {
                           "database" => { "url" => db_url },
                           "zeromq" => { "batch_endpoint" => "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}",
                                         "result_endpoint" => "tcp://127.0.0.1:#{TaskerCore::Socket.free_tcp_port}" },
                           "retention" => { "finished_after" => nil }
                         })
    example.run
  ensure
    described_class.stop
    TaskerCore::Internal::OrchestrationManager.instance.close
  end

  it "starts, reports and stops the orchestration loop of this process, the same one the old name reaches" do
    expect(described_class.running?).to be(false)
    expect(described_class.start).to eq(described_class)
    expect(described_class.running?).to be(true)
    expect(TaskerCore::Internal::OrchestrationManager.instance.orchestrating?).to be(true)
    expect(described_class.stats).to include("loop")
    expect(described_class.stop).to be(true)
    expect(described_class.running?).to be(false)

    TaskerCore::Internal::OrchestrationManager.instance.start_orchestration
    expect(described_class.running?).to be(true)
  end
end
