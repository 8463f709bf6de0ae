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

  def spawn_python(python, script)
    pid = Process.spawn(python, script, "--batch-endpoint", peer.batch_endpoint, "--result-endpoint",
                        peer.result_endpoint, "--worker-id", worker_id, "--concurrency", "3",
                        "--heartbeat-interval-ms", "100", err: ENV["SPEC_LOG"] ? :err : File::NULL, pgroup: true)
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
    expect(by_step.keys).to match_array([1, 2, 3, 4, 5])
    expect(by_step[1]).to include("status" => "complete", "task_id" => 7, "worker_id" => worker_id)
    expect(by_step[1]["output"]).to eq("echo" => { "order" => 42 }, "config" => { "x" => 1 }, "language" => "python")
    expect(by_step[2]["output"]).to eq("sum" => 5)
    expect(by_step[3]).to include("attempt" => 2)
    expect(by_step[3]["error"]).to include("class" => "TaskerCore::RetryableError", "retryable" => true, "retry_after" => 1.5)
    expect(by_step[4]["error"]).to include("class" => "TaskerCore::PermanentError", "retryable" => false)
    expect(by_step[5]["error"]).to include("class" => "TaskerCore::UnknownHandlerError", "retryable" => false)

    completion = peer.completions(batch_id).first
    expect(completion["steps"].map { |s| s["status"] }).to eq(%w[complete complete error error error])
    expect(peer.messages.index(completion)).to be > peer.partials(batch_id).map { |m| peer.messages.index(m) }.max

    # Bad input is dropped and the worker keeps serving.
    topic = TaskerCore::Protocol.batch_topic(worker_id)
    peer.send_raw([topic, "\xC1".b])
    peer.send_raw([topic, TaskerCore::Codec.pack(TaskerCore::Protocol.batch(batch_id: "v2", worker_id: worker_id, steps: [])
                                                                     .merge("protocol_version" => 2))])
    second = peer.send_batch(worker_id, [steps.first])
    peer.wait_for("the second completion") { peer.completions(second).any? }
    expect(peer.completions("v2")).to be_empty

    Process.kill(:TERM, pid)
    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    expect(Process.wait2(pid).last.exitstatus).to eq(0)
  end
end
