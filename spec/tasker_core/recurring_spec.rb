# frozen_string_literal: true

require "tmpdir"

RSpec.describe TaskerCore::Recurring do
  def config_file(yaml)
    path = File.join(Dir.mktmpdir("recurring_config"), "tasker-config.yml")
    File.write(path, yaml)
    path
  end

  def load_recurring(entries_yaml)
    path = config_file("default:\n  recurring:\n#{entries_yaml.gsub(/^/, '    ')}")
    [path, TaskerCore::Config.load(path: path, env: "test")]
  end

  def refusal(entries_yaml)
    path = config_file("default:\n  recurring:\n#{entries_yaml.gsub(/^/, '    ')}")
    expect { TaskerCore::Config.load(path: path, env: "test") }.to raise_error(TaskerCore::ConfigurationError) { |e| return [path, e.message] }
  end

  describe "the configuration" do
    it "reads the entries, with namespace default, context {} and backfill false unless given" do
      _, config = load_recurring(<<~YAML)
        - name: nightly
          task: build_report
          cron: "0 3 * * * Europe/Amsterdam"
        - { name: fast, task: ping, namespace: ops, cron: "*/10 * * * * *", context: { a: 1 }, backfill: true, priority: 5, queue: low }
      YAML
      nightly, fast = described_class.schedules(config)
      expect(nightly.to_h.slice(:name, :task, :namespace, :context, :backfill, :queue, :priority))
        .to eq(name: "nightly", task: "build_report", namespace: "default", context: {}, backfill: false, queue: nil, priority: nil)
      expect(fast.to_h.slice(:namespace, :context, :backfill, :queue, :priority))
        .to eq(namespace: "ops", context: { "a" => 1 }, backfill: true, queue: "low", priority: 5)
      expect(nightly.next_tick(Time.utc(2026, 6, 1, 12)).utc).to eq(Time.utc(2026, 6, 2, 1)) # 03:00 CEST
      expect(fast.entry(Time.utc(2026, 6, 1, 12, 0, 10))).to eq(
        name: "ping", namespace: "ops", version: nil, context: { "a" => 1 }, queue: "low", priority: 5,
        identity_key: "recurring:fast:2026-06-01T12:00:10Z"
      )
    end

    it "defaults to no recurring tasks" do
      expect(described_class.schedules(TaskerCore::Config.load(path: config_file("default:\n"), env: "test"))).to eq([])
    end

    {
      %(- { name: nightly, task: build_report, cron: "61 * * * *" }) =>
        %(recurring[0] (nightly).cron: expected a cron expression such as),
      %(- { name: nightly, task: build_report, cron: "@daily", every: 1 }) =>
        "recurring[0] (nightly).every: unknown key (known: name, task,",
      %(- { name: nightly, cron: "@daily" }) => "recurring[0] (nightly).task: missing",
      %(- { name: nightly, task: r, cron: "@daily", backfill: "yes" }) =>
        %(recurring[0] (nightly).backfill: expected true or false, got "yes"),
      %(- { name: nightly, task: r, cron: "@daily", priority: high }) =>
        %(recurring[0] (nightly).priority: expected an Integer between -100 and 100 (higher runs first), got "high"),
      %(- { name: nightly, task: r, cron: "@daily", priority: 500 }) =>
        %(recurring[0] (nightly).priority: expected an Integer between -100 and 100 (higher runs first), got 500),
      %(- { name: nightly, task: r, cron: "@daily", queue: "no spaces" }) =>
        %(recurring[0] (nightly).queue: expected a queue name (1 to 63 of A-Z a-z 0-9 _ . : -), got "no spaces"),
      %(- { name: a, task: r, cron: "@daily" }\n- { name: a, task: s, cron: "@hourly" }) =>
        "recurring[1] (a).name: already used by recurring[0]",
      %(- just a string) => %(recurring[0]: expected a mapping (name, task, cron, ...), got "just a string")
    }.each do |entries, message|
      it "refuses #{entries.lines.first.strip} naming the file, the entry and the key" do
        path, text = refusal(entries)
        expect(text).to start_with(%(Invalid tasker_core configuration in #{path} (section "default"): ))
        expect(text).to include(message)
      end
    end

    it "refuses recurring: at the top level of the file" do
      path = config_file("recurring: []\n")
      expect { TaskerCore::Config.load(path: path, env: "test") }
        .to raise_error(TaskerCore::ConfigurationError, /recurring: settings go under default: or an environment section/)
    end
  end

  describe TaskerCore::Recurring::Schedule do
    let(:schedule) do
      _, config = load_recurring(%(- { name: s, task: t, cron: "*/10 * * * * *" }))
      TaskerCore::Recurring.schedules(config).first
    end

    it "lists the ticks in (after, upto], oldest first" do
      from = Time.utc(2026, 1, 1, 0, 0, 0)
      expect(schedule.ticks(from, from + 30)).to eq([[from + 10, from + 20, from + 30], false])
      expect(schedule.ticks(from, from + 9.9)).to eq([[], false])
    end

    it "keeps the latest MAX_TICKS of a long gap and says it left older ones out" do
      from = Time.utc(2026, 1, 1)
      ticks, skipped = schedule.ticks(from, from + 86_400)
      expect(ticks.size).to eq(TaskerCore::Recurring::MAX_TICKS)
      expect(ticks.last).to eq(from + 86_400)
      expect(ticks.first).to eq(from + 86_400 - (10 * (TaskerCore::Recurring::MAX_TICKS - 1)))
      expect(skipped).to be(true)
    end
  end
end

RSpec.describe TaskerCore::Recurring::Scheduler, :db do
  include StoreHelpers

  before { use_templates(template("ping", [step("only")], namespace: "ops")) }

  def schedules(backfill:, queue: nil, priority: nil)
    entry = { name: "tick", task: "ping", namespace: "ops", cron: "* * * * * *", backfill: backfill,
              queue: queue, priority: priority }.compact
    config = TaskerCore::Config.load(env: "test", overrides: { recurring: [entry] })
    TaskerCore::Recurring.schedules(config)
  end

  def ticks
    TaskerCore::Store.with_connection do |c|
      c.exec("SELECT identity_key FROM tasker_tasks WHERE identity_key LIKE 'recurring:tick:%' ORDER BY identity_key")
       .map { |r| Time.iso8601(r["identity_key"].delete_prefix("recurring:tick:")) }
    end
  end

  def recorded_last
    TaskerCore::Store.with_connection do |c|
      c.exec("SELECT last_tick_at, last_task_id FROM tasker_recurring_schedules WHERE name = 'tick'").first
    end
  end

  it "with backfill: true creates the latest MAX_TICKS ticks missed since the recorded one, and says it skipped older ones" do
    long_ago = Time.at(Time.now.to_i - 3600).utc
    TaskerCore::Store.with_connection do |c|
      c.exec("INSERT INTO tasker_recurring_schedules (name, last_tick_at) VALUES ('tick', $1)", [long_ago.iso8601])
    end
    log = StringIO.new
    started = Time.now
    scheduler = described_class.new(schedules(backfill: true, queue: "ops_q", priority: 5),
                                     logger: Logger.new(log)).start
    wait_until(timeout: 20, message: "the backfill") { ticks.size >= TaskerCore::Recurring::MAX_TICKS }
    scheduler.stop
    created = ticks
    backfilled = created.select { |t| t <= started }
    expect(backfilled.size).to eq(TaskerCore::Recurring::MAX_TICKS)
    expect(backfilled).to eq((0...backfilled.size).map { |i| backfilled.first + i }) # the latest ones, one a second
    expect(backfilled.last).to be > started - 2
    expect(log.string).to include("tasker recurring: tick: ticks before #{backfilled.first.utc.iso8601} skipped")
    expect(Time.parse(recorded_last["last_tick_at"].to_s)).to eq(created.last)
    steps = TaskerCore.task(recorded_last["last_task_id"])[:steps]
    expect(steps.map { |s| s.values_at(:queue, :priority) }).to eq([["ops_q", 5]])
  end

  it "without backfill starts from now and stops at once when told, mid-wait" do
    TaskerCore::Store.with_connection do |c|
      c.exec("INSERT INTO tasker_recurring_schedules (name, last_tick_at) VALUES ('tick', now() - interval '1 hour')")
    end
    started = Time.now
    scheduler = described_class.new(schedules(backfill: false), logger: Logger.new(nil)).start
    wait_until(timeout: 20, message: "two ticks") { ticks.size >= 2 }
    scheduler.stop
    expect(scheduler.running?).to be(false)
    expect(ticks.first).to be > started
    expect(ticks).to eq((0...ticks.size).map { |i| ticks.first + i })
  end
end
