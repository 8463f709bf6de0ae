# frozen_string_literal: true

require "stringio"
require "tasker_core/cli/progress"

RSpec.describe TaskerCore::CLI::Progress do
  let(:io) { StringIO.new }
  let(:clock) { [100.0] }

  def progress(**opts)
    described_class.new(title: "Tasks finished", total: 100, io: io, unit: " tasks", clock: -> { clock[0] }, **opts)
  end

  it "reports the rate since it appeared, under a second included, leaving out work done before" do
    p = progress(tty: false, interval: 0.2, start: 10)
    clock[0] += 0.5
    p.update(30)
    expect(io.string).to eq("Tasks finished: 30/100 (30%), 40.0 tasks/s, ETA 2s\n")
    clock[0] += 0.5
    p.update(100)
    p.finish
    expect(io.string.lines.last).to eq("Tasks finished: 100/100 (100%), 90.0 tasks/s\n")
  end

  it "redraws a bar in place on a terminal and ends the line when finished" do
    p = progress(tty: true)
    clock[0] += 2
    p.update(50)
    p.finish
    frames = io.string.split("\r").reject(&:empty?)
    expect(frames.first).to start_with("[#{' ' * 30}] Tasks finished: 0/100 (0%), 0.0 tasks/s")
    expect(frames.last).to eq("[#{'=' * 15}#{' ' * 15}] Tasks finished: 50/100 (50%), 25.0 tasks/s, ETA 2s\e[K\n")
  end
end
