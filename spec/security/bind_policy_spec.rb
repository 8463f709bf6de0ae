# frozen_string_literal: true

# Secure by default (docs/security.md): the orchestrator refuses to bind an
# address other hosts can reach without CURVE unless allow_insecure is set.
RSpec.describe TaskerCore::BindPolicy, :no_valgrind do
  after do
    @handle&.close
    TaskerCore.reset_config!
  end

  def handle(**opts)
    @handle = TaskerCore::OrchestrationHandle.new(heartbeat_timeout_ms: 1500, **opts)
  end

  it "refuses a non-loopback bind without CURVE, naming the endpoint and zeromq.allow_insecure" do
    ["tcp://0.0.0.0:*", "tcp://*:*", "tcp://[::]:*"].each do |exposed|
      expect { handle(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: exposed) }
        .to raise_error(TaskerCore::ConfigurationError) { |e|
          expect(e.message).to include(exposed, "zeromq.allow_insecure", "without CURVE")
          expect(e.message).not_to include("tcp://127.0.0.1")
        }
    end
    expect(@handle).to be_nil
  end

  it "refuses before anything is bound" do
    port = free_port
    expect { handle(batch_endpoint: "tcp://0.0.0.0:#{port}", result_endpoint: "tcp://127.0.0.1:*") }
      .to raise_error(TaskerCore::ConfigurationError, /tcp:\/\/0\.0\.0\.0:#{port}/)
    TCPServer.new("0.0.0.0", port).close # the port is still free
  end

  it "binds a non-loopback address with allow_insecure: true, or zeromq.allow_insecure in the configuration" do
    handle(batch_endpoint: "tcp://0.0.0.0:*", result_endpoint: "tcp://0.0.0.0:*", allow_insecure: true)
    expect(@handle.zeromq_config["batch_endpoint"]).to start_with("tcp://0.0.0.0:")
    @handle.close

    TaskerCore.config = TaskerCore::Config.load(overrides: { zeromq: { allow_insecure: true } })
    handle(batch_endpoint: "tcp://0.0.0.0:*", result_endpoint: "tcp://127.0.0.1:*")
    expect(@handle).not_to be_closed
    @handle.close

    # An explicit false wins over the configuration.
    expect { handle(batch_endpoint: "tcp://0.0.0.0:*", result_endpoint: "tcp://127.0.0.1:*", allow_insecure: false) }
      .to raise_error(TaskerCore::ConfigurationError, /zeromq\.allow_insecure/)
  end

  it "binds a non-loopback address with CURVE" do
    _pub, sec = TaskerCore::Curve.keypair
    handle(batch_endpoint: "tcp://0.0.0.0:*", result_endpoint: "tcp://0.0.0.0:*", curve_secret_key: sec,
           curve_allowed_client_keys: [])
    expect(@handle.curve?).to be(true)
  end

  it "lets loopback, ipc and inproc endpoints and a disabled handle through" do
    handle(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.2:*")
    @handle.close
    handle(batch_endpoint: "ipc://#{Dir.tmpdir}/tasker-bind-#{rand(1 << 30)}", result_endpoint: "inproc://bind-#{rand(1 << 30)}")
    @handle.close
    handle(enabled: false, batch_endpoint: "tcp://0.0.0.0:5555", result_endpoint: "tcp://0.0.0.0:5556")
  end

  it "refuses through the configuration path too (OrchestrationManager's options)" do
    TaskerCore.config = TaskerCore::Config.load(overrides: { zeromq: { batch_endpoint: "tcp://0.0.0.0:#{free_port}" } })
    opts = TaskerCore::Internal::OrchestrationManager.new.handle_options
    expect { handle(**opts) }.to raise_error(TaskerCore::ConfigurationError, /tcp:\/\/0\.0\.0\.0.*zeromq\.allow_insecure/)
  end

  it "tells loopback endpoints from reachable ones" do
    expect(%w[tcp://127.0.0.1:1 tcp://127.5.6.7:1 tcp://localhost:2 tcp://[::1]:3 ipc:///tmp/x inproc://y]
             .map { |e| described_class.loopback_endpoint?(e) }).to all(be(true))
    expect(%w[tcp://*:1 tcp://0.0.0.0:1 tcp://[::]:1 tcp://10.0.0.5:1 tcp://eth0:1 tcp://example.com:1 udp://127.0.0.1:1]
             .map { |e| described_class.loopback_endpoint?(e) }).to all(be(false))
  end

  it "rejects an allow_insecure that is not a boolean" do
    expect { handle(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*", allow_insecure: "yes") }
      .to raise_error(ArgumentError, /allow_insecure/)
  end
end
