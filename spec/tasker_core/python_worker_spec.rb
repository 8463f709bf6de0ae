# frozen_string_literal: true

# The Python example worker is written from docs/protocol.md alone; running
# it against the Ruby test peer checks that the document is enough and that
# what it produces passes TaskerCore::Protocol.validate! (ProtocolPeer
# decodes every message with it).
RSpec.describe "examples/python_worker/worker.py" do
  script = File.join(SpecHelpers::ROOT, "examples", "python_worker", "worker.py")
  # The first interpreter on PATH may be one without the Debian packages.
  python = ["/usr/bin/python3", "python3"].find do |candidate|
    system(candidate, "-c", "import zmq, msgpack", out: File::NULL, err: File::NULL)
  end

  let(:peer) { ProtocolPeer.new }
  let(:worker_id) { "py-#{Process.pid}-#{rand(1 << 30)}" }

  after { peer.close }

  before { skip "no python3 with pyzmq and msgpack" unless python }

  def spawn_python(python, script, *extra, err: ENV["SPEC_LOG"] ? :err : File::NULL)
    pid = Process.spawn(python, script, "--batch-endpoint", peer.batch_endpoint, "--result-endpoint",
                        peer.result_endpoint, "--worker-id", worker_id, "--concurrency", "3",
                        "--heartbeat-interval-ms", "100", *extra, err: err, pgroup: true)
    (@spawned_pids ||= []) << pid
    pid
  end

  it "runs a batch, streams valid partials and a completion, and drains on TERM" do
    pid = spawn_python(python, script)
    peer.wait_for_worker(worker_id)
    expect(peer.heartbeats.first).to include("capacity" => 3, "in_flight" => 0, "pid" => pid)

    steps = [
      { step_id: 1, task_id: 7, step_name: "echo", handler: "Python::Echo", handler_config: { "x" => 1 },
        context: { "order" => 42 } },
      { step_id: 2, task_id: 7, step_name: "sum", handler: "Python::SumDependencies",
        dependency_results: { "a" => { "value" => 2 }, "b" => { "value" => 3 } } },
      { step_id: 3, task_id: 7, step_name: "fail", handler: "Python::Fail", attempt: 2 },
      { step_id: 4, task_id: 7, step_name: "never", handler: "Python::FailPermanently" },
      { step_id: 5, task_id: 7, step_name: "who", handler: "Ruby::Only" }
    ]
    batch_id = peer.send_batch(worker_id, steps)
    peer.wait_for("the completion") { peer.completions(batch_id).any? }

    by_step = peer.partials(batch_id).to_h { |m| [m["step_id"], m] }
    expect(by_step.keys).to match_array([1, 2, 3, 4])
    expect(by_step[1]).to include("status" => "complete", "task_id" => 7, "worker_id" => worker_id)
    expect(by_step[1]["output"]).to eq("echo" => { "order" => 42 }, "config" => { "x" => 1 }, "language" => "python")
    expect(by_step[2]["output"]).to eq("sum" => 5)
    expect(by_step[3]).to include("attempt" => 2)
    expect(by_step[3]["error"]).to include("class" => "TaskerCore::RetryableError", "retryable" => true, "retry_after" => 1.5)
    expect(by_step[4]["error"]).to include("class" => "TaskerCore::PermanentError", "retryable" => false)
    # A handler it lacks is refused before any result, so another worker can run the step.
    refusal = peer.of_type("batch_refusal").find { |m| m["batch_id"] == batch_id }
    expect(refusal).to include("reason" => "unknown_handler", "worker_id" => worker_id)
    expect(refusal["steps"]).to eq([{ "step_id" => 5, "attempt" => 1, "reason" => "unknown_handler",
                                      "message" => "no handler registered as 'Ruby::Only'" }])
    expect(peer.messages.index(refusal)).to be < peer.partials(batch_id).map { |m| peer.messages.index(m) }.min

    completion = peer.completions(batch_id).first
    expect(completion["steps"].map { |s| s["status"] }).to eq(%w[complete complete error error])
    expect(peer.messages.index(completion)).to be > peer.partials(batch_id).map { |m| peer.messages.index(m) }.max

    # Bad input is dropped and the worker keeps serving.
    topic = TaskerCore::Protocol.batch_topic(worker_id)
    peer.send_raw([topic, "\xC1".b])
    peer.send_raw([topic, TaskerCore::Codec.pack(TaskerCore::Protocol.batch(batch_id: "v3", worker_id: worker_id, steps: [])
                                                                     .merge("protocol_version" => 3))])
    second = peer.send_batch(worker_id, [steps.first])
    peer.wait_for("the second completion") { peer.completions(second).any? }
    expect(peer.completions("v3")).to be_empty
    # A version 1 batch is run too (an orchestrator sends each worker its own version).
    old = peer.send_batch(worker_id, [steps.first], version: 1)
    peer.wait_for("the version 1 batch's completion") { peer.completions(old).any? }

    Process.kill(:TERM, pid)
    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    expect(Process.wait2(pid).last.exitstatus).to eq(0)
    expect(peer.raw.map { |m| m["protocol_version"] }.uniq).to eq([2])
  end

  it "sends results that are ready together as one partial_results, and refuses non-string output keys" do
    # Results go to a subscriber that has not subscribed yet: the worker holds them until it does.
    results = TaskerCore::Socket::Subscriber.new(bind: "tcp://127.0.0.1:*", topics: [])
    Dir.mktmpdir do |dir|
      pid = Process.spawn(python, script, "--batch-endpoint", peer.batch_endpoint, "--result-endpoint",
                          results.last_endpoint, "--worker-id", worker_id, "--concurrency", "3",
                          err: ENV["SPEC_LOG"] ? :err : File::NULL, pgroup: true)
      peer.wait_for("the worker's batch subscription") { peer.batch_subscriptions.any? }
      steps = (1..6).map do |i|
        { step_id: i, task_id: 7, step_name: "t#{i}", handler: "Python::Touch", context: { "n" => i, "touch" => "#{dir}/#{i}" } }
      end
      steps << { step_id: 7, task_id: 7, step_name: "int_keys", handler: "Python::IntKeys", context: { "touch" => "#{dir}/7" } }
      steps << { step_id: 8, task_id: 7, step_name: "bytes", handler: "Python::Bytes", context: { "touch" => "#{dir}/8" } }
      batch_id = peer.send_batch(worker_id, steps)
      wait_until(message: "every step to finish") { Dir.children(dir).size == 8 }

      got = release_held_results(results)
      # Every result once; those ready together went together. (One whose handler had returned but
      # whose entry was not queued yet when the subscription came can still go on its own, after.)
      grouped = got.select { |m| m["type"] == "partial_results" }
      entries = grouped.flat_map { |m| m["results"] } + got.select { |m| m["type"] == "partial_result" }
      expect(entries.map { |e| e["step_id"] }).to match_array((1..8).to_a)
      expect(grouped.map { |m| m["results"].size }.max).to be >= 2, got.map { |m| m["type"] }.inspect
      by_step = entries.to_h { |e| [e["step_id"], e] }
      expect(by_step.values).to all(include("batch_id" => batch_id))
      expect(by_step[3]["output"]).to eq("n" => 3)
      expect(by_step[7]).to include("status" => "error", "output" => nil)
      expect(by_step[7]["error"]).to include("class" => "TypeError", "retryable" => false)
      expect(by_step[7]["error"]["message"]).to include("output.rows[0].1", "not a string")
      expect(by_step[8]["output"]).to eq("raw" => "\x00\xff".b)
      expect(entries.map { |e| got.index { |m| m.equal?(e) || m["results"]&.any? { |r| r.equal?(e) } } }.max)
        .to be < got.index { |m| m["type"] == "batch_completion" }
    ensure
      if pid
        Process.kill(:TERM, pid)
        Process.wait(pid)
      end
      results.close
    end
  end

  it "connects with CURVE when given keys, and a worker whose key is not allowed gets nothing" do
    server_public, server_secret = TaskerCore::Curve.keypair
    client_public, client_secret = TaskerCore::Curve.keypair
    Dir.mktmpdir do |dir|
      key_file = File.join(dir, "worker.key")
      File.write(key_file, "# tasker_core CURVE secret key\n#{client_secret}\n")
      File.chmod(0o600, key_file)
      # KEY=VALUE: a Z85 key may start with "-", which a separate argument would turn into an option.
      curve = ["--curve-server-key=#{server_public}", "--curve-public-key=#{client_public}", "--curve-secret-key-file=#{key_file}"]
      secure = ProtocolPeer.new(curve_secret_key: server_secret, allowed_client_keys: [client_public])
      begin
        pid = Process.spawn(python, script, "--batch-endpoint", secure.batch_endpoint, "--result-endpoint",
                            secure.result_endpoint, "--worker-id", worker_id, "--heartbeat-interval-ms", "100", *curve,
                            err: ENV["SPEC_LOG"] ? :err : File::NULL, pgroup: true)
        secure.wait_for_worker(worker_id)
        batch_id = secure.send_batch(worker_id, [{ step_id: 1, task_id: 1, step_name: "echo", handler: "Python::Echo",
                                                   context: { "secret" => true } }])
        secure.wait_for("the completion over CURVE") { secure.completions(batch_id).any? }
        expect(secure.partials(batch_id).first["output"]).to include("echo" => { "secret" => true })
        Process.kill(:TERM, pid)
        expect(Process.wait2(pid).last.exitstatus).to eq(0)
        pid = nil

        # Another key pair, not on the allow-list: no handshake, so no heartbeat ever arrives.
        other_public, other_secret = TaskerCore::Curve.keypair
        other_file = File.join(dir, "other.key")
        File.write(other_file, "#{other_secret}\n")
        File.chmod(0o600, other_file)
        intruder = "#{worker_id}-x"
        pid = Process.spawn(python, script, "--batch-endpoint", secure.batch_endpoint, "--result-endpoint",
                            secure.result_endpoint, "--worker-id", intruder, "--heartbeat-interval-ms", "50",
                            "--curve-server-key=#{server_public}", "--curve-public-key=#{other_public}",
                            "--curve-secret-key-file=#{other_file}", err: File::NULL, pgroup: true)
        wait_until(message: "the refused handshakes") { secure.poll(timeout_ms: 20) && secure.handshakes[:denied] >= 2 }
        expect(secure.heartbeats.map { |h| h["worker_id"] }).not_to include(intruder)

        # A key file others can read is refused before anything connects.
        File.chmod(0o644, other_file)
        out = IO.popen([python, script, "--curve-server-key=#{server_public}", "--curve-public-key=#{other_public}",
                        "--curve-secret-key-file=#{other_file}", err: %i[child out]], &:read)
        expect($?.success?).to be(false)
        expect(out).to include("readable or writable by group or others")
      ensure
        if pid
          Process.kill(:TERM, pid)
          Process.wait(pid)
        end
        secure.close
      end
    end
  end
end
