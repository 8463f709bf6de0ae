# frozen_string_literal: true

require "optparse"
require "stringio"
require "tasker_core/cli"
require "tasker_core/cli/worker"

RSpec.describe TaskerCore::Worker::Settings do
  let(:config) { TaskerCore.config }

  it "takes every value from the configuration unless a keyword overrides it, once, frozen" do
    settings = described_class.build(config: config, curve: nil, max_workers: 3, linger_ms: 7)
    expect(settings).to be_frozen
    expect(settings.max_workers).to eq(3)
    expect(settings.linger_ms).to eq(7)
    expect(settings.send_hwm).to eq(config.dig("zeromq", "send_hwm"))
    expect(settings.batch_endpoint).to eq(config.dig("zeromq", "batch_endpoint"))
    expect(settings.heartbeat_interval_s).to eq(config.dig("zeromq", "heartbeat_interval_ms") / 1000.0)
    expect(settings.step_timeout_s).to eq(config.dig("worker", "step_timeout_ms") / 1000.0)
    expect(settings.own_result_limits).to eq({ max_result_bytes: config.dig("zeromq", "max_result_bytes"),
                                               max_message_bytes: config.dig("zeromq", "max_message_bytes"),
                                               max_payload_depth: config.dig("zeromq", "max_payload_depth") }.compact)
  end

  it "refuses an unknown keyword, a bad worker id, a max_workers that is not a positive Integer, a negative prefetch" do
    expect { described_class.build(curve: nil, max_wrokers: 2) }.to raise_error(ArgumentError, /max_wrokers/)
    expect { described_class.build(curve: nil, worker_id: "bad id!") }.to raise_error(ArgumentError, /worker_id/)
    expect { described_class.build(curve: nil, max_workers: 0) }.to raise_error(ArgumentError, /max_workers/)
    expect { described_class.build(curve: nil, prefetch: -1) }.to raise_error(ArgumentError, /prefetch/)
    expect { described_class.build(curve: nil, prefetch: 10_001) }.to raise_error(ArgumentError, /prefetch/)
  end

  it "takes as many steps as it has threads unless worker.prefetch adds waiting room" do
    expect(described_class.build(config: config, curve: nil, max_workers: 3).capacity).to eq(3)
    expect(described_class.build(config: config, curve: nil, max_workers: 3, prefetch: 5).capacity).to eq(8)
  end

  it "is what the worker runs with, and never shows a CURVE secret key" do
    keys = { server_key: "s" * 40, public_key: "p" * 40, secret_key: "SECRET" * 7 }
    worker = TaskerCore::Orchestration::BatchStepExecutionOrchestrator.new(curve: keys, max_workers: 2,
                                                                          worker_id: "settings-spec")
    expect(worker.settings).to be_frozen
    expect(worker.settings.curve).to eq(keys)
    expect([worker.worker_id, worker.max_workers]).to eq(["settings-spec", 2])
    expect([worker.inspect, worker.settings.inspect].join).not_to include("SECRET")
  end
end

RSpec.describe "the worker's command line" do
  def switches(parser) = parser.top.list.filter_map { |s| s.long.first if s.respond_to?(:long) }

  it "has the same options in exe/tasker-worker and `tasker worker` (which adds --app)" do
    exe = OptionParser.new { |o| TaskerCore::WorkerProcess.define_options(o, {}) }
    cli = TaskerCore::CLI::Worker.new(name: "worker", out: StringIO.new, err: StringIO.new).parser
    expect(switches(exe)).not_to be_empty
    expect(switches(cli) - %w[--app --config --env --trace --help]).to eq(switches(exe))
  end

  it "refuses a --prefetch outside worker.prefetch's bounds before anything starts" do
    parse = lambda do |*argv|
      options = {}
      OptionParser.new { |o| TaskerCore::WorkerProcess.define_options(o, options) }.parse!(["--handlers", __FILE__, *argv])
      TaskerCore::WorkerProcess.validate!(options)
    end
    expect(parse.("--prefetch", "100")).to include(prefetch: 100)
    expect { parse.("--prefetch", "-1") }.to raise_error(ArgumentError, /--prefetch must be between 0 and 10000/)
    expect { parse.("--prefetch", "10001") }.to raise_error(ArgumentError, /--prefetch/)
  end
end
