# frozen_string_literal: true

require_relative "../fixtures/compat_handlers"

# A rolling deploy mixes protocol versions (docs/protocol.md section 12): the
# version 1 Python worker, frozen as it was before version 2
# (spec/fixtures/protocol_v1_worker.py), runs beside version 2 Ruby workers
# against a real orchestrator process and a real PostgreSQL. The version 1
# worker drops any batch that is not protocol_version 1, so a step it ran
# proves it was sent a version 1 batch; every step completes exactly once.
RSpec.describe "protocol versions 1 and 2 side by side", :db, :no_valgrind do
  V1_WORKER = File.expand_path("../fixtures/protocol_v1_worker.py", __dir__)
  COMPAT_HANDLERS = File.expand_path("../fixtures/compat_handlers.rb", __dir__)
  python = ["/usr/bin/python3", "python3"].find do |candidate|
    system(candidate, "-c", "import zmq, msgpack", out: File::NULL, err: File::NULL)
  end

  let(:conn) { connect }

  before { skip "no python3 with pyzmq and msgpack" unless python }

  after { cleanup_durable }

  def outputs(ids)
    conn.exec("SELECT s.name, s.output FROM tasker_workflow_steps s WHERE s.task_id = ANY($1::bigint[])",
              ["{#{ids.join(',')}}"]).map do |r|
      [r["name"], TaskerCore::Codec.unpack(r["output"])]
    end
  end

  it "completes every step exactly once with a version 1 worker beside version 2 workers" do
    use_templates(template("mixed", [step("a", [], handler: "Python::Echo", handler_config: { "k" => 1 }),
                                     step("b", [], handler: "Python::Echo"),
                                     step("c", [], handler: "Python::Echo"),
                                     step("sum", %w[a b c], handler: "Python::SumDependencies")]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep)
    2.times { spawn_fault_worker(batch_ep, result_ep, concurrency: 3, handlers: [COMPAT_HANDLERS]) }
    v1 = Process.spawn(python, V1_WORKER, "--batch-endpoint", batch_ep, "--result-endpoint", result_ep,
                       "--concurrency", "6", "--heartbeat-interval-ms", "200",
                       err: ENV["SPEC_LOG"] ? :err : File::NULL, pgroup: true)
    (@spawned_pids ||= []) << v1
    # All three live before the work exists: a Ruby worker boots slower than
    # the Python one, which could otherwise run every step alone.
    wait_until(timeout: 30, message: "the three workers live") do
      conn.exec("SELECT count(*)::int AS n FROM tasker_workers WHERE connected AND capacity > 0").first["n"] == 3
    end

    ids = TaskerCore.create_tasks(Array.new(60) { |i| { name: "mixed", context: { "n" => i } } })
    expect_finished_exactly_once(ids, timeout: 90)

    done = outputs(ids)
    # The Python SumDependencies does not say its language; Echo does.
    by_language = done.reject { |name, _| name == "sum" }.map { |_name, out| out["language"] }.tally
    expect(by_language.keys).to contain_exactly("python", "ruby"), by_language.inspect
    echo = done.find { |name, out| name == "a" && out["language"] == "python" }
    expect(echo&.last).to include("echo" => include("n" => Integer), "config" => { "k" => 1 })
    expect(done.select { |name, _| name == "sum" }.map { |_, out| out["sum"] }.uniq).to eq([0])
    # No step was lost on the way: each ran once (a batch the version 1 worker
    # dropped would have cost a lost attempt and shown up here).
    lost = conn.exec("SELECT count(*) AS n FROM tasker_workflow_steps WHERE task_id = ANY($1::bigint[]) AND lost_attempts > 0",
                     ["{#{ids.join(',')}}"]).first["n"].to_i
    expect(lost).to eq(0)
    expect_live_after_fault(orch, template_name: "mixed")
  end
end
