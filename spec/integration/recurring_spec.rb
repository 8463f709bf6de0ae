# frozen_string_literal: true

require "time"
require_relative "../cli/cli_helpers"

# Recurring tasks from the `recurring:` configuration, run by real
# `tasker orchestrator` processes on one database.
RSpec.describe "recurring tasks", :db do
  include CLIHelpers

  before { clear_workers }

  after do
    (@spawned || []).each do |pid|
      Process.kill(:KILL, pid)
      Process.wait(pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
  end

  TEMPLATE = <<~YAML
    name: heartbeat_report
    namespace: ops
    version: 1.0.0
    context_schema:
      type: object
      required: [format]
      properties:
        format: { type: string }
    steps:
      - name: report
        handler: Ops::HeartbeatReport
  YAML

  def write_config(recurring, level: "debug")
    dir = Dir.mktmpdir("recurring_spec")
    FileUtils.mkdir_p(File.join(dir, "tasks"))
    File.write(File.join(dir, "tasks", "heartbeat_report.yml"), TEMPLATE)
    path = File.join(dir, "tasker-config.yml")
    config = { "default" => { "logging" => { "level" => level },
                              "tasks" => { "template_dir" => File.join(dir, "tasks") },
                              "recurring" => recurring } }
    File.write(path, YAML.dump(config))
    path
  end

  def every_second(backfill: false)
    [{ "name" => "every_second", "task" => "heartbeat_report", "namespace" => "ops", "cron" => "* * * * * *",
       "context" => { "format" => "pdf" }, "backfill" => backfill }]
  end

  def start_orchestrator(config_path)
    log = File.join(Dir.mktmpdir("recurring_orch"), "out.log")
    env = CLIHelpers::CLEAN_ENV.merge(db_env).merge("TASKER_CONFIG_PATH" => config_path,
                                                    "TASKER_BATCH_ENDPOINT" => tcp_endpoint,
                                                    "TASKER_RESULT_ENDPOINT" => tcp_endpoint)
    pid = Process.spawn(env, *tasker_command("orchestrator", "--stats-interval", "0"), out: log, err: [:child, :out],
                                                                                        chdir: CLIHelpers::ROOT)
    (@spawned ||= []) << pid
    wait_until(timeout: 30, message: "the orchestrator's scheduler to start:\n#{File.read(log) rescue ''}") do
      File.exist?(log) && File.read(log).include?("tasker recurring: 1 schedule(s)")
    end
    [pid, log]
  end

  def stop(pid)
    Process.kill(:TERM, pid)
    status = wait_until(timeout: 30, message: "the orchestrator to exit") { Process.waitpid2(pid, Process::WNOHANG)&.last }
    @spawned.delete(pid)
    expect(status.exitstatus).to eq(0)
  end

  # { tick time => [task ids] } of the every_second schedule, from the tasks themselves.
  def ticks
    TaskerCore::Store.with_connection do |c|
      c.exec("SELECT id, identity_key, name, namespace FROM tasker_tasks WHERE identity_key LIKE 'recurring:every_second:%'")
       .each_with_object(Hash.new { |h, k| h[k] = [] }) do |r, out|
        expect([r["namespace"], r["name"]]).to eq(%w[ops heartbeat_report])
        out[Time.iso8601(r["identity_key"].delete_prefix("recurring:every_second:"))] << r["id"]
      end
    end
  end

  # The ticks a process's log says it created: { tick => task id }.
  def logged_ticks(log)
    File.read(log).scan(/every_second: tick (\S+) -> task (\d+)/).to_h { |t, id| [Time.iso8601(t), Integer(id)] }
  end

  def expect_every_second(times)
    expect(times).to eq((0..(times.last - times.first).round).map { |i| times.first + i })
  end

  it "two orchestrators create each tick's task exactly once, and a restart skips the ticks missed meanwhile" do
    config = write_config(every_second)
    first_pid, first_log = start_orchestrator(config)
    second_pid, second_log = start_orchestrator(config)
    both_running = Time.now
    wait_until(timeout: 30, message: "five ticks with both orchestrators running") { ticks.keys.count { |t| t > both_running } >= 5 }
    [first_pid, second_pid].each { |pid| stop(pid) }
    stopped = Time.now

    before = ticks
    expect(before.values.map(&:size).uniq).to eq([1])
    times = before.keys.sort
    expect_every_second(times)
    # Both processes created (or found) the same ticks while both ran: one task each, the same one.
    first, second = logged_ticks(first_log), logged_ticks(second_log)
    shared = first.keys & second.keys
    expect(shared.count { |t| t > both_running }).to be >= 4
    shared.each { |t| expect([first[t], second[t]]).to eq([before[t].first] * 2) }
    expect(first.merge(second).transform_values { |id| [id] }).to eq(before)

    status = JSON.parse(tasker("status", "--json", env: db_env.merge("TASKER_CONFIG_PATH" => config)).out)
    expect(status["recurring"].size).to eq(1)
    row = status["recurring"].first
    expect(row).to include("name" => "every_second", "task" => "ops/heartbeat_report", "cron" => "* * * * * *",
                           "last_tick_at" => times.last.utc.iso8601, "last_task_id" => before[times.last].first)
    expect(Time.iso8601(row["next_tick_at"])).to be > stopped

    # Everything down for a few seconds: without backfill those ticks never get a task.
    sleep 3
    restarted = Time.now
    pid, = start_orchestrator(config)
    wait_until(timeout: 30, message: "three ticks after the restart") { ticks.keys.count { |t| t > restarted } >= 3 }
    stop(pid)
    after = ticks
    expect(after.values.map(&:size).uniq).to eq([1])
    new_times = after.keys.sort - times
    expect(new_times.first).to be > restarted
    expect(after.keys.select { |t| t > times.last && t <= restarted }).to eq([])
    expect_every_second(new_times)

    # backfill: true resumes from the last tick recorded: the ticks missed while down are created.
    last = after.keys.max
    sleep 2
    pid, = start_orchestrator(write_config(every_second(backfill: true)))
    resumed = Time.now
    wait_until(timeout: 30, message: "a tick after the backfilled restart") { ticks.keys.any? { |t| t > resumed } }
    stop(pid)
    backfilled = ticks
    expect(backfilled.values.map(&:size).uniq).to eq([1])
    expect(backfilled.keys.count { |t| t > last && t <= resumed }).to be >= 2
    expect_every_second(backfilled.keys.sort.select { |t| t >= last })
  end

  it "refuses at boot a schedule whose template does not exist or refuses its context, naming the file, entry and key" do
    config = write_config([{ "name" => "nightly", "task" => "no_such_report", "namespace" => "ops", "cron" => "@daily" }])
    r = tasker("orchestrator", env: db_env.merge("TASKER_CONFIG_PATH" => config, "TASKER_BATCH_ENDPOINT" => tcp_endpoint,
                                                 "TASKER_RESULT_ENDPOINT" => tcp_endpoint))
    expect(r.exitstatus).to eq(1)
    expect(r.err).to include("Invalid tasker_core configuration in #{config}: recurring[0] (nightly).task: no task template " \
                             "ops/no_such_report")

    config = write_config([{ "name" => "nightly", "task" => "heartbeat_report", "namespace" => "ops", "cron" => "@daily",
                             "context" => { "format" => 7 } }])
    r = tasker("orchestrator", env: db_env.merge("TASKER_CONFIG_PATH" => config, "TASKER_BATCH_ENDPOINT" => tcp_endpoint,
                                                 "TASKER_RESULT_ENDPOINT" => tcp_endpoint))
    expect(r.exitstatus).to eq(1)
    expect(r.err).to include("Invalid tasker_core configuration in #{config}: recurring[0] (nightly).context:")
    expect(ticks).to be_empty
  end
end
