# frozen_string_literal: true

RSpec.describe TaskerCore::Internal::OrchestrationManager do
  let(:manager) { described_class.instance }
  let(:options) { { batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*", linger_ms: 0 } }

  # Configuration comes from TaskerCore.config once the config branch is in;
  # here the options are pinned so the specs bind free ports.
  before do
    manager.reset!
    opts = manager.handle_options.merge(options)
    allow(manager).to receive(:handle_options).and_return(opts)
  end

  after { manager.reset! }

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

  it "reads zeromq settings with built-in defaults for what config lacks" do
    opts = described_class.new.handle_options
    expect(opts.keys).to contain_exactly(:enabled, :batch_endpoint, :result_endpoint, :send_hwm, :recv_hwm,
                                         :linger_ms, :heartbeat_timeout_ms)
    expect(opts[:heartbeat_timeout_ms]).to be_a(Integer)
    expect(opts[:batch_endpoint]).to start_with("tcp://")
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
