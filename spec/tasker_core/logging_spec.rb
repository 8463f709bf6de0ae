# frozen_string_literal: true

require "json"
require "logger"
require "open3"
require "pty"
require "stringio"

RSpec.describe "TaskerCore logging" do
  let(:io) { StringIO.new }
  let(:event) { TaskerCore::Logging.event("step failed", task_id: 7, step_id: 31, step_name: "charge", attempt: 2, worker_id: "w-1", skipped: nil) }
  let(:iso_ms) { /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/ }

  after { TaskerCore.logger = nil }

  it "writes text lines with an ISO 8601 UTC time in milliseconds, the level, the process and the fields" do
    logger = Logger.new(io, progname: "tasker_core", formatter: TaskerCore::Logging::TextFormatter.new)
    logger.warn(event)
    logger.info("plain")
    first, second = io.string.lines
    expect(first).to match(/\A#{iso_ms}  WARN tasker_core\[#{Process.pid}\]: step failed task_id=7 step_id=31 step_name=charge attempt=2 worker_id=w-1\n\z/)
    expect(second).to end_with("INFO tasker_core[#{Process.pid}]: plain\n")
  end

  it "writes one JSON object per line with the fields as keys" do
    logger = Logger.new(io, progname: "tasker_core", formatter: TaskerCore::Logging::JSONFormatter.new)
    logger.warn(event)
    logger.error(RuntimeError.new("boom"))
    first, second = io.string.lines.map { |l| JSON.parse(l) }
    expect(first).to include("level" => "warn", "pid" => Process.pid, "progname" => "tasker_core", "message" => "step failed",
                             "task_id" => 7, "step_id" => 31, "step_name" => "charge", "attempt" => 2, "worker_id" => "w-1")
    expect(first).not_to have_key("skipped")
    expect(first["time"]).to match(/\A#{iso_ms}\z/)
    expect(second["message"]).to eq("boom (RuntimeError)")
  end

  it "reads as text in a logger with another formatter (Rails' calls inspect on what is not a String)" do
    logger = Logger.new(io, formatter: ->(_sev, _time, _prog, msg) { "#{msg.is_a?(String) ? msg : msg.inspect}\n" })
    logger.info(event)
    expect(io.string).to eq("step failed task_id=7 step_id=31 step_name=charge attempt=2 worker_id=w-1\n")
  end

  it "follows logging.format and logging.level on the gem's own logger" do
    TaskerCore.logger = nil
    TaskerCore.configure(env: "test", overrides: { logging: { format: "json", level: "debug" } })
    expect(TaskerCore.logger.formatter).to be_a(TaskerCore::Logging::JSONFormatter)
    expect(TaskerCore.logger.level).to eq(Logger::DEBUG)
    TaskerCore.configure(env: "test", overrides: { logging: { format: "text" } })
    expect(TaskerCore.logger.formatter).to be_a(TaskerCore::Logging::TextFormatter)
  end

  it "logs to stdout in a terminal and to stderr when stdout is not one" do
    lib = File.expand_path("../../lib", __dir__)
    script = 'require "tasker_core/config"; TaskerCore.logger.warn("hello from the logger")'
    out, err, = Open3.capture3(RbConfig.ruby, "-I", lib, "-e", script)
    expect(out).to eq("")
    expect(err).to include("WARN tasker_core[", "hello from the logger")

    output = +""
    PTY.spawn(RbConfig.ruby, "-I", lib, "-e", script, err: File::NULL) do |r, _w, pid|
      begin
        r.each_line { |l| output << l }
      rescue Errno::EIO
        nil # the child closed the terminal
      end
      Process.wait(pid)
    end
    expect(output).to include("hello from the logger")
  end
end
