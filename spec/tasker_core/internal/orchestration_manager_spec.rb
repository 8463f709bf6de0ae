# frozen_string_literal: true

RSpec.describe TaskerCore::Internal::OrchestrationManager do
  let(:manager) { described_class.instance }
  # Free ports, through the configuration the manager reads.
  before do
    manager.reset!
    TaskerCore.configure(overrides: { zeromq: { batch_endpoint: "tcp://127.0.0.1:*",
                                                result_endpoint: "tcp://127.0.0.1:*", linger_ms: 0 } })
  end

  after do
    manager.reset!
    TaskerCore.reset_config!
  end

  it "is one instance per process" do
    expect(described_class.instance).to be(manager)
    expect(Array.new(4) { Thread.new { described_class.instance } }.map(&:value).uniq).to eq([manager])
  end

  it "builds the handle on first use and returns the same one after" do
    expect(manager.handle_built?).to be(false)
    handle = manager.orchestration_handle
    expect(handle).to be_a(TaskerCore::OrchestrationHandle)
    expect(manager.orchestration_handle).to be(handle)
    expect(handle.zeromq_config["batch_endpoint"]).to match(%r{\Atcp://127\.0\.0\.1:\d+\z})
  end

  it "closes the handle on reset! and builds a new one next time" do
    first = manager.orchestration_handle
    manager.reset!
    expect(first.closed?).to be(true)
    expect(manager.orchestration_handle).not_to be(first)
  end

  it "builds the handle's options from the zeromq section of the configuration" do
    opts = described_class.new.handle_options
    zeromq = TaskerCore.config.zeromq
    expect(opts).to include(enabled: zeromq["enabled"], batch_endpoint: zeromq["batch_endpoint"],
                            result_endpoint: zeromq["result_endpoint"], send_hwm: zeromq["send_hwm"],
                            recv_hwm: zeromq["recv_hwm"], linger_ms: zeromq["linger_ms"],
                            heartbeat_timeout_ms: zeromq["heartbeat_timeout_ms"],
                            max_message_bytes: zeromq["max_message_bytes"])
  end

  it "gives a forked child a fresh manager and leaves the parent's handle alone", :spawns do
    parent_handle = manager.orchestration_handle
    r, w = IO.pipe
    pid = fork do
      r.close
      child = described_class.instance
      report = [child.equal?(manager), child.handle_built?]
      begin
        parent_handle.workers
      rescue TaskerCore::ForkSafetyError
        report << :fork_safety
      end
      w.write(Marshal.dump(report))
      w.close
      exit!(0)
    end
    w.close
    report = Marshal.load(r.read)
    Process.wait(pid)
    r.close
    expect(report).to eq([false, false, :fork_safety])
    expect(parent_handle.workers).to eq([])
    expect(described_class.instance).to be(manager)
  end
end
