# frozen_string_literal: true

require "tmpdir"
require "yaml"
require "stringio"
require "logger"

# CurveZMQ on both channels (docs/security.md): real sockets, real worker
# processes (exe/tasker-worker), the ZAP handler's allow-list.
RSpec.describe "CurveZMQ", :no_valgrind do
  HANDLERS_FILE = File.expand_path("../fixtures/integration_handlers.rb", __dir__)
  WORKER = File.expand_path("../../exe/tasker-worker", __dir__)
  curve = TaskerCore::Curve

  before(:all) do
    @dir = Dir.mktmpdir("tasker_core_curve")
    @server_pub, @server_sec = curve.keypair
    @worker_pub, @worker_sec = curve.keypair
    @intruder_pub, @intruder_sec = curve.keypair
  end

  after(:all) { FileUtils.rm_rf(@dir) }

  after do
    @handle&.close
    (@pids || []).each do |pid|
      Process.kill(:KILL, -pid)
    rescue Errno::ESRCH
      nil
    end
    (@pids || []).each do |pid|
      Process.wait(pid)
    rescue Errno::ECHILD
      nil
    end
  end

  def new_handle(allowed: [@worker_pub], **opts)
    @handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*",
                                                  heartbeat_timeout_ms: 1500, curve_secret_key: @server_sec,
                                                  curve_allowed_client_keys: allowed, **opts)
  end

  def config_file(curve_enabled: true)
    path = File.join(@dir, "config-#{rand(1 << 30)}.yml")
    File.write(path, { "default" => {
      "zeromq" => { "heartbeat_interval_ms" => 200, "heartbeat_timeout_ms" => 1500,
                    "curve" => { "enabled" => curve_enabled, "server_public_key" => @server_pub } },
      "logging" => { "level" => ENV["CURVE_SPEC_DEBUG"] ? "debug" : "error" }
    } }.to_yaml)
    path
  end

  def spawn_worker(handle, secret:, curve_enabled: true, worker_id: "w#{rand(1 << 30)}")
    cfg = handle.zeromq_config
    env = { "TASKER_CONFIG_PATH" => config_file(curve_enabled: curve_enabled), "TASKER_ENV" => "test",
            "TASKER_CURVE_CLIENT_SECRET_KEY" => secret }
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"), WORKER,
                        "--handlers", HANDLERS_FILE, "--concurrency", "4", "--worker-id", worker_id,
                        "--batch-endpoint", cfg["batch_endpoint"], "--result-endpoint", cfg["result_endpoint"],
                        pgroup: true, err: ENV["CURVE_SPEC_DEBUG"] ? $stderr : File::NULL, out: File::NULL)
    (@pids ||= []) << pid
    worker_id
  end

  def step(id)
    { "step_id" => id, "task_id" => 1, "step_name" => "s#{id}", "handler" => "IntegrationHandlers::Succeed",
      "handler_config" => {}, "attempt" => 1, "timeout_ms" => 10_000, "context" => {}, "dependency_results" => {} }
  end

  def pump_until(handle, results = [], timeout: 30, message: "condition")
    wait_until(timeout: timeout, message: message) do
      results.concat(handle.receive_results(timeout_ms: 50))
      yield results
    end
    results
  end

  describe "keys" do
    it "makes Z85 key pairs whose public key derives from the secret key" do
      pub, sec = curve.keypair
      expect([pub.size, sec.size]).to eq([40, 40])
      expect(curve.valid_key?(pub)).to be(true)
      expect(curve.public_key(sec)).to eq(pub)
      expect(curve.valid_key?("not a key")).to be(false)
    end

    it "writes key files with mode 0600 and refuses to overwrite them" do
      prefix = File.join(@dir, "orchestrator")
      pub_path, sec_path, pub = curve.write_keypair(prefix)
      expect(File.stat(sec_path).mode & 0o777).to eq(0o600)
      expect(File.stat(pub_path).mode & 0o777).to eq(0o600)
      expect(curve.read_key_file(pub_path, secret: false)).to eq(pub)
      expect(curve.public_key(curve.read_key_file(sec_path))).to eq(pub)
      expect { curve.write_keypair(prefix) }.to raise_error(TaskerCore::ConfigurationError, /already exists/)
    end

    it "refuses a secret key file readable by group or others, without showing the key" do
      _pub, sec_path, = curve.write_keypair(File.join(@dir, "loose-#{rand(1 << 30)}"))
      secret = curve.read_key_file(sec_path)
      File.chmod(0o644, sec_path)
      expect { curve.read_key_file(sec_path) }.to raise_error(TaskerCore::ConfigurationError) { |e|
        expect(e.message).to include("chmod 600", "0644")
        expect(e.message).not_to include(secret)
      }
    end

    it "refuses any key file group or others may write, and a public key file they may read" do
      pub_path, sec_path, = curve.write_keypair(File.join(@dir, "writable-#{rand(1 << 30)}"))
      [[sec_path, 0o622], [sec_path, 0o602], [pub_path, 0o620], [pub_path, 0o604]].each do |path, mode|
        File.chmod(mode, path)
        expect { curve.read_key_file(path, secret: path == sec_path) }
          .to raise_error(TaskerCore::ConfigurationError, /#{Regexp.escape(path)}.*#{format('%04o', mode)}.*chmod 600 #{Regexp.escape(path)}/)
      end
    end

    it "refuses an allowed client keys file group or others may read or write, and takes it at 0600" do
      list = File.join(@dir, "allowed-#{rand(1 << 30)}")
      File.write(list, "#{@worker_pub}\n")
      config = TaskerCore::Config.load(overrides: { zeromq: { curve: { enabled: true, allowed_client_keys_file: list } } })
      [0o646, 0o620, 0o640, 0o604].each do |mode|
        File.chmod(mode, list)
        expect { curve.allowed_client_keys(config) }.to raise_error(TaskerCore::ConfigurationError) { |e|
          expect(e.message).to include("allowed client keys file #{list}", format("%04o", mode), "chmod 600 #{list}")
        }
      end
      File.chmod(0o600, list)
      expect(curve.allowed_client_keys(config)).to eq([@worker_pub])
      File.chmod(0o400, list)
      expect(curve.allowed_client_keys(config)).to eq([@worker_pub])
    end

    it "tasker keygen writes a key pair and prints only the public key" do
      prefix = File.join(@dir, "cli-#{rand(1 << 30)}")
      out = IO.popen([RbConfig.ruby, "-I", File.join(SpecHelpers::ROOT, "lib"),
                      File.join(SpecHelpers::ROOT, "exe/tasker"), "keygen", prefix], err: %i[child out], &:read)
      expect($?.exitstatus).to eq(0)
      secret = curve.read_key_file("#{prefix}.key")
      expect(out).to include(curve.public_key(secret))
      expect(out).not_to include(secret)
      expect(File.stat("#{prefix}.key").mode & 0o777).to eq(0o600)
    end

    it "reads the server's options from configuration, the secret from a file or the environment" do
      _pub, sec_path, = curve.write_keypair(File.join(@dir, "srv-#{rand(1 << 30)}"))
      list = File.join(@dir, "allowed-#{rand(1 << 30)}")
      File.write(list, "# workers\n#{@worker_pub}\n\n#{@intruder_pub} # another\n")
      File.chmod(0o600, list)
      config = TaskerCore::Config.load(overrides: { zeromq: { curve: {
        enabled: true, server_secret_key_file: sec_path, allowed_client_keys: [@worker_pub], allowed_client_keys_file: list
      } } })
      opts = curve.handle_options(config)
      expect(opts[:curve_secret_key]).to eq(curve.read_key_file(sec_path))
      expect(opts[:curve_allowed_client_keys]).to eq([@worker_pub, @intruder_pub])
      expect(opts[:max_message_bytes]).to eq(config.dig("zeromq", "max_message_bytes"))

      ENV[curve::SERVER_SECRET_ENV] = @server_sec
      expect(curve.handle_options(config)[:curve_secret_key]).to eq(@server_sec)
    ensure
      ENV.delete(curve::SERVER_SECRET_ENV)
    end

    it "refuses CURVE without a secret key, naming the setting" do
      config = TaskerCore::Config.load(overrides: { zeromq: { curve: { enabled: true } } })
      expect { curve.handle_options(config) }.to raise_error(TaskerCore::ConfigurationError, /server_secret_key_file/)
      expect { curve.client_options(config) }.to raise_error(TaskerCore::ConfigurationError, /server_public_key/)
    end

    it "refuses a malformed key in the configuration" do
      expect { TaskerCore::Config.load(overrides: { zeromq: { curve: { allowed_client_keys: ["short"] } } }) }
        .to raise_error(TaskerCore::ConfigurationError, /allowed_client_keys/)
    end
  end

  describe "sockets" do
    # A bound SUB attaches new peers only when it is used: keep it polled.
    def subscriptions_of(pub, server, secs)
      seen = []
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + secs
      while seen.empty? && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
        server.receive(timeout_ms: 0)
        seen.concat(pub.subscriptions(timeout_ms: 20))
      end
      seen
    end

    it "lets an allowed client in and keeps a wrong key and a plain client out" do
      server = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*",
                                                  curve_server: { secret_key: @server_sec, allowed_client_keys: [@worker_pub] })
      ep = server.last_endpoint
      good = TaskerCore::Socket::Publisher.new(connect: ep, curve_client: { server_key: @server_pub, public_key: @worker_pub, secret_key: @worker_sec })
      bad = TaskerCore::Socket::Publisher.new(connect: ep, curve_client: { server_key: @server_pub, public_key: @intruder_pub, secret_key: @intruder_sec })
      plain = TaskerCore::Socket::Publisher.new(connect: ep)
      expect(subscriptions_of(good, server, 10)).to eq([[:subscribe, ""]])
      wait_until(message: "the intruder's handshake denied") { server.receive(timeout_ms: 10).nil? && server.handshakes[:denied] >= 1 }
      expect(bad.subscriptions(timeout_ms: 0)).to eq([])
      expect(plain.subscriptions(timeout_ms: 0)).to eq([])
      [bad, plain, good].each { |p| p.send_message("t", "from #{p.equal?(good) ? 'good' : 'other'}") }
      got = []
      wait_until(message: "the allowed client's message") { (m = server.receive(timeout_ms: 50)) && got << m; got.any? }
      expect(got).to eq([%w[t from\ good]])
      expect(server.receive(timeout_ms: 200)).to be_nil
      expect(server.handshakes).to include(allowed: 1)
    ensure
      [good, bad, plain, server].compact.each(&:close)
    end

    it "reports a refused handshake on both sides: the refused key to take_refusals, handshake_failed_auth to the client" do
      curve.take_refusals # refusals of earlier examples
      server = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*",
                                                  curve_server: { secret_key: @server_sec, allowed_client_keys: [@worker_pub] })
      bad = TaskerCore::Socket::Publisher.new(connect: server.last_endpoint, monitor: true,
                                              curve_client: { server_key: @server_pub, public_key: @intruder_pub, secret_key: @intruder_sec })
      events = []
      wait_until(message: "handshake_failed_auth on the client") do
        server.receive(timeout_ms: 10)
        events.concat(bad.events)
        events.any? { |e| e[:event] == :handshake_failed_auth }
      end
      expect(events.map { |e| e[:event] }).not_to include(:handshake_succeeded)
      refusals = curve.take_refusals
      expect(refusals).to include(public_key: @intruder_pub, domain: server.zap_domain, count: be >= 1)
      expect(refusals.map { |r| r[:public_key] }).not_to include(@worker_pub)
    ensure
      [bad, server].compact.each(&:close)
    end

    it "logs refused keys at most once per key per 60 s and counts the rest" do
      curve.take_refusals
      server = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*",
                                                  curve_server: { secret_key: @server_sec, allowed_client_keys: [@worker_pub] })
      refuse_once = lambda do
        before = server.handshakes[:denied]
        client = TaskerCore::Socket::Publisher.new(connect: server.last_endpoint, linger: 0,
                                                   curve_client: { server_key: @server_pub, public_key: @intruder_pub, secret_key: @intruder_sec })
        wait_until(message: "a refused handshake") { server.receive(timeout_ms: 10).nil? && server.handshakes[:denied] > before }
        client.close
      end
      log = StringIO.new
      logger = Logger.new(log)
      t = 1000.0
      refuse_once.call
      expect(curve.log_refusals(logger, now: t)).to be >= 1
      refuse_once.call
      curve.log_refusals(logger, now: t + 30)
      expect(log.string.scan(@intruder_pub).size).to eq(1)
      expect(log.string).to include("ZAP domain #{server.zap_domain}", "not on the allow-list")
      expect(log.string).to match(/refused \d+ more CURVE handshake/) # the rest, counted
      refuse_once.call
      curve.log_refusals(logger, now: t + 61)
      expect(log.string.scan(@intruder_pub).size).to eq(2)
      expect(log.string).not_to include(@intruder_sec)
    ensure
      server&.close
    end

    it "swaps the allow-list for the next handshake" do
      server = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*",
                                                  curve_server: { secret_key: @server_sec, allowed_client_keys: [] })
      server.allowed_client_keys = [@intruder_pub]
      client = TaskerCore::Socket::Publisher.new(connect: server.last_endpoint,
                                                 curve_client: { server_key: @server_pub, public_key: @intruder_pub, secret_key: @intruder_sec })
      expect(subscriptions_of(client, server, 10)).to eq([[:subscribe, ""]])
    ensure
      [client, server].compact.each(&:close)
    end
  end

  describe "the orchestration handle" do
    it "dispatches to a worker whose key is allowed and never sees one whose key is not" do
      handle = new_handle
      expect(handle.curve?).to be(true)
      good = spawn_worker(handle, secret: @worker_sec)
      curve.take_refusals # refusals of earlier examples
      spawn_worker(handle, secret: @intruder_sec, worker_id: "intruder")
      spawn_worker(handle, secret: @intruder_sec, curve_enabled: false, worker_id: "plaintext")
      results = pump_until(handle, message: "the allowed worker live and both others denied") do
        handle.workers.map { |w| w["id"] } == [good] && handle.stats[:handshakes][:denied] >= 1
      end
      handle.publish_batch({ "batch_id" => "b1", "steps" => [step(1), step(2)] })
      pump_until(handle, results, message: "the batch's completion") { |r| r.any? { |m| m["type"] == "batch_completion" } }
      expect(results.select { |m| m["type"] == "partial_result" }.map { |m| [m["worker_id"], m["status"]] })
        .to eq([[good, "complete"], [good, "complete"]])
      expect(handle.workers.map { |w| w["id"] }).to eq([good])
      # The refused worker's public key, for the orchestrator's log.
      refused = curve.take_refusals
      expect(refused.map { |r| r[:public_key] }).to include(@intruder_pub)
      expect(refused.map { |r| r[:public_key] }).not_to include(@worker_pub)
    end

    it "accepts nothing a peer without a key sends: forged heartbeats and results change nothing" do
      handle = new_handle
      good = spawn_worker(handle, secret: @worker_sec)
      results = pump_until(handle, message: "the worker live") { handle.workers.any? }
      handle.publish_batch({ "batch_id" => "b1", "steps" => [step(7)] })
      forger = TaskerCore::Socket::Publisher.new(connect: handle.zeromq_config["result_endpoint"])
      forged = TaskerCore::Protocol.partial_result(batch_id: "b1", worker_id: good, step_id: 7, task_id: 1, attempt: 1,
                                                    started_at: Time.now, finished_at: Time.now, output: { "forged" => true })
      beat = TaskerCore::Protocol.heartbeat(worker_id: "forger", capacity: 100, in_flight: 0)
      20.times do
        forger.send_parts(TaskerCore::Protocol.encode(forged))
        forger.send_parts(TaskerCore::Protocol.encode(beat))
        forger.send_parts(["partial_result", "\xC1garbage".b])
      end
      pump_until(handle, results, message: "the real result") { |r| r.any? { |m| m["type"] == "batch_completion" } }
      partials = results.select { |m| m["type"] == "partial_result" }
      expect(partials.size).to eq(1)
      expect(partials.first["output"]).not_to include("forged")
      expect(handle.workers.map { |w| w["id"] }).to eq([good])
      # Nothing of the forger's reached the parser at all.
      expect(handle.stats[:bad_messages].values.sum).to eq(0)
    ensure
      forger&.close
    end

    it "counts and drops result bodies over max_result_bytes and keeps serving" do
      # Every batch tells its worker max_result_bytes and a worker cuts its
      # results to fit, so the oversized body comes from a peer with an
      # allowed key that ignores the limit.
      handle = new_handle(allowed: [@worker_pub], max_result_bytes: 600)
      peer = TaskerCore::Socket::Publisher.new(connect: handle.zeromq_config["result_endpoint"],
                                               curve_client: { server_key: @server_pub, public_key: @worker_pub,
                                                               secret_key: @worker_sec })
      big = TaskerCore::Protocol.partial_result(batch_id: "big", worker_id: "raw", step_id: 1, task_id: 1, attempt: 1,
                                                started_at: Time.now, finished_at: Time.now,
                                                output: { "blob" => "x" * 2000 })
      results = pump_until(handle, message: "the oversized partial counted") do
        peer.send_parts(TaskerCore::Protocol.encode(big))
        handle.stats[:bad_messages][:too_large] >= 1
      end
      expect(results.select { |m| m["type"] == "partial_result" }).to eq([])
      good = spawn_worker(handle, secret: @worker_sec)
      pump_until(handle, results, message: "the worker live") { handle.workers.map { |w| w["id"] } == [good] }
      handle.publish_batch({ "batch_id" => "small", "steps" => [step(2)] })
      pump_until(handle, results, message: "the batch's completion") { |r| r.any? { |m| m["type"] == "batch_completion" } }
      expect(results.select { |m| m["type"] == "partial_result" }.map { |m| [m["step_id"], m["status"]] })
        .to eq([[2, "complete"]])
    ensure
      peer&.close
    end
  end
end
