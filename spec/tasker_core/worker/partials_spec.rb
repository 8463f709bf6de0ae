# frozen_string_literal: true

require "logger"
require "stringio"

# A step's result entry as the worker's pool threads make it (docs/protocol.md
# 4.2, 4.3): checked against the orchestrator's limits and version 2's rules,
# packed once; the I/O thread splices entries into messages.
RSpec.describe TaskerCore::Worker::Partials do
  let(:stats) { TaskerCore::Worker::Stats.new(logger: Logger.new(StringIO.new), worker_id: "w-1") }
  let(:partials) { described_class.new(worker_id: "w-1", stats: stats) }

  def job(limits: {}, started_at: 1_700_000_000.5)
    batch = TaskerCore::Worker::BatchState.new(id: "b-1", limits: limits)
    TaskerCore::Worker::Job.new(batch: batch, index: 0, started_at: started_at,
                                step: { "step_id" => 5, "task_id" => 2, "attempt" => 3 })
  end

  def entry_of(out)
    TaskerCore::Codec.unpack(out.entry)
  end

  it "packs an entry the I/O thread sends as a partial_result of this worker" do
    out = partials.encode(job, { "ok" => true, sym: [1] }, nil)
    expect(out.kind).to eq("complete")
    expect(entry_of(out)).to include("batch_id" => "b-1", "step_id" => 5, "task_id" => 2, "attempt" => 3,
                                     "status" => "complete", "output" => { "ok" => true, "sym" => [1] }, "error" => nil,
                                     "started_at" => 1_700_000_000.5)
    msg = TaskerCore::Protocol.decode(TaskerCore::Protocol.result_frames("w-1", [out.entry]))
    expect(msg).to include("type" => "partial_result", "protocol_version" => 2, "worker_id" => "w-1", "step_id" => 5)
  end

  it "gives a step that never started started_at = finished_at" do
    e = entry_of(partials.timeout(job(started_at: nil), "gave up"))
    expect(e["started_at"]).to eq(e["finished_at"])
    expect(e["duration_ms"]).to eq(0.0)
    expect(e["error"]).to include("class" => "TaskerCore::StepTimeoutError", "retryable" => true)
  end

  it "fails an output with a map key that is not a string (TypeError, not retryable)" do
    out = partials.encode(job, { "rows" => [{ 7 => "x" }] }, nil)
    expect(out.kind).to eq("error")
    expect(out.error).to include("class" => "TypeError", "retryable" => false)
    expect(out.error["message"]).to include("output.rows[0].7")
    expect(entry_of(out)["output"]).to be_nil
  end

  it "fails a result over the orchestrator's limit, counting the envelope, and keeps the limit on the entry" do
    out = partials.encode(job(limits: { max_result_bytes: 1000 }), { "blob" => "x" * 900 }, nil)
    expect(out.error).to include("class" => "TaskerCore::PayloadTooLargeError", "retryable" => false)
    expect(out.limit).to eq(1000)
    fits = partials.encode(job(limits: { max_result_bytes: 1000 }), { "blob" => "x" * 500 }, nil)
    expect(fits.kind).to eq("complete")
    expect(fits.entry.bytesize + described_class::ENVELOPE_BYTES).to be <= 1000
  end
end
