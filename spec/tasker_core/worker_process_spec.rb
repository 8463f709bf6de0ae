# frozen_string_literal: true

require "tmpdir"

RSpec.describe TaskerCore::WorkerProcess do
  let(:peer) { ProtocolPeer.new }
  let(:dir) { Dir.mktmpdir("tasker-worker-spec") }
  let(:worker_id) { "proc-#{Process.pid}-#{rand(1 << 30)}" }
  let(:exe) { File.join(SpecHelpers::ROOT, "exe", "tasker-worker") }

  after do
    peer.close
    FileUtils.rm_rf(dir)
  end

  # The handler signals through files because it runs in another process:
  # it creates <started> when it begins and returns once <release> exists.
  def write_handlers
    File.write(File.join(dir, "file_gate.rb"), <<~RUBY)
      class SpecFileGate < TaskerCore::StepHandler
        def call(task, _sequence, step)
          File.write(task.context["started"], step.id.to_s)
          sleep 0.01 until File.exist?(task.context["release"])
          { "released" => step.id, "pid" => Process.pid }
        end
      end
    RUBY
  end

  def spawn_worker(*extra)
    write_handlers
    spawn_ruby("load ARGV.shift", exe, "--handlers", dir, "--concurrency", "2",
               "--batch-endpoint", peer.batch_endpoint, "--result-endpoint", peer.result_endpoint,
               "--worker-id", worker_id, *extra, err: ENV["SPEC_LOG"] ? :err : File::NULL)
  end

  it "drains on TERM: finishes the running step, reports it, says goodbye and exits 0" do
    pid = spawn_worker
    peer.wait_for_worker(worker_id)
    started = File.join(dir, "started")
    release = File.join(dir, "release")
    step = { step_id: 5, task_id: 9, step_name: "gate", handler: "SpecFileGate",
             context: { "started" => started, "release" => release } }
    batch_id = peer.send_batch(worker_id, [step])
    wait_until(message: "the step to start") { File.exist?(started) }

    Process.kill(:TERM, pid)
    peer.wait_for("a draining heartbeat") { peer.heartbeats.last["capacity"].zero? }
    expect(peer.of_type("goodbye")).to be_empty
    File.write(release, "")

    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    _, status = Process.wait2(pid)
    expect(status.exitstatus).to eq(0)
    partial = peer.partials(batch_id).first
    expect(partial).to include("status" => "complete", "output" => { "released" => 5, "pid" => pid })
    expect(peer.completions(batch_id).size).to eq(1)
    expect(peer.messages.last["type"]).to eq("goodbye")
  end

  it "stops taking work on TSTP and takes it again on CONT" do
    pid = spawn_worker
    peer.wait_for_worker(worker_id)
    Process.kill(:TSTP, pid)
    peer.wait_for("a paused heartbeat") { peer.heartbeats.last["capacity"].zero? }
    Process.kill(:CONT, pid)
    peer.wait_for("a resumed heartbeat") { peer.heartbeats.last["capacity"] == 2 }
    Process.kill(:INT, pid)
    peer.wait_for("goodbye") { peer.of_type("goodbye").any? }
    expect(Process.wait2(pid).last.exitstatus).to eq(0)
  end

  it "exits 2 with usage when --handlers is missing" do
    r, w = IO.pipe
    pid = spawn_ruby("load ARGV.shift", exe, err: w)
    w.close
    expect(Process.wait2(pid).last.exitstatus).to eq(2)
    expect(r.read).to include("--handlers is required", "Usage:")
  ensure
    r&.close
  end
end
