# frozen_string_literal: true

require "time"
require_relative "internal/background_thread"
require_relative "queues"

module TaskerCore
  # Recurring tasks: the `recurring:` entries of the configuration, each a
  # task template and a cron expression (parsed by fugit: five fields, or
  # six with seconds first, an optional time zone last, or @hourly/@daily/...).
  #
  #   default:
  #     recurring:
  #       - name: nightly_report            # unique; names the schedule in the database and in status
  #         task: build_report              # a task template (tasks.template_dir)
  #         namespace: reports              # default "default"
  #         cron: "0 3 * * * Europe/Amsterdam"
  #         context: { format: pdf }        # checked against the template's context_schema at boot
  #         backfill: false                 # the default: ticks missed while no orchestrator ran are skipped
  #
  # Every orchestrator process runs a Scheduler: a thread that sleeps until
  # the next tick of any schedule (no query while it waits), then creates the
  # ticks that are due in one statement, each with the identity_key
  # "recurring:<name>:<tick, ISO 8601 UTC>", so several orchestrators on one
  # database create each tick's task exactly once, and records the latest
  # tick per schedule (tasker_recurring_schedules, db/migrate/0012).
  module Recurring
    KEYS = %w[name task namespace version cron context queue priority backfill].freeze
    REQUIRED = %w[name task cron].freeze
    # Most ticks of one schedule created in one go: a backfill, or a process
    # that was paused, creates the latest this many and skips older ones.
    MAX_TICKS = 100
    NAME = /\A[A-Za-z0-9_.\-]{1,100}\z/
    CRON_EXAMPLE = %("*/5 * * * *", "*/10 * * * * *" (seconds first), "0 3 * * * Europe/Amsterdam" or "@hourly")

    Schedule = Struct.new(:index, :name, :task, :namespace, :version, :cron, :expression, :context, :queue, :priority,
                          :backfill, keyword_init: true) do
      def identity_key(tick) = "recurring:#{name}:#{tick.utc.iso8601}"

      # The first tick strictly after time.
      def next_tick(time) = cron.next_time(time).to_t

      # Ticks in (after, upto], oldest first: at most limit, the latest ones;
      # and whether older ones were left out.
      def ticks(after, upto, limit: MAX_TICKS)
        found = []
        t = Time.at(upto.to_i + 1) # cron works in whole seconds: the first previous time is upto's second or before
        loop do
          t = cron.previous_time(t).to_t
          break if t <= after

          found << t
          break if found.size > limit
        end
        [found.first(limit).reverse, found.size > limit]
      end

      def where = "recurring[#{index}] (#{name})"

      # A TaskerCore.create_tasks entry for one tick.
      def entry(tick)
        e = { name: task, namespace: namespace, version: version, context: context, identity_key: identity_key(tick) }
        e[:queue] = queue if queue
        e[:priority] = priority if priority
        e
      end
    end

    class << self
      # nil when value is a valid `recurring:` list, else [where, problem]:
      # where is "" or "[i] (name).key".
      def problem(value)
        return ["", "expected a list of entries (name, task, cron, ...), got #{value.inspect} (#{value.class})"] unless value.is_a?(Array)

        names = {}
        value.each_with_index do |entry, i|
          found = entry_problem(entry, i)
          return found if found

          name = entry["name"] || entry[:name]
          return ["[#{i}] (#{name}).name", "already used by recurring[#{names[name]}]"] if names.key?(name)

          names[name] = i
        end
        nil
      end

      # The Schedules of config's `recurring:` (already checked by Config).
      def schedules(config = TaskerCore.config)
        Array(config["recurring"]).each_with_index.map do |e, i|
          e = e.to_h { |k, v| [k.to_s, v] }
          Schedule.new(index: i, name: e["name"], task: e["task"], namespace: e.fetch("namespace", "default") || "default",
                       version: e["version"]&.to_s, cron: parse_cron(e["cron"]), expression: e["cron"],
                       context: e["context"] || {}, queue: e["queue"], priority: e["priority"],
                       backfill: e["backfill"] == true).freeze
        end
      end

      # Each schedule's template exists and takes its context; else
      # ConfigurationError naming the file, the entry and the key.
      def check_templates!(schedules, templates, path)
        schedules.each do |s|
          begin
            template = templates.find(name: s.task, namespace: s.namespace, version: s.version)
          rescue ConfigurationError => e
            raise ConfigurationError, "Invalid tasker_core configuration in #{path}: #{s.where}.task: #{e.message}"
          end
          begin
            template.validate_context!(s.context)
          rescue ValidationError => e
            raise ConfigurationError, "Invalid tasker_core configuration in #{path}: #{s.where}.context: #{e.message}"
          end
        end
      end

      # What `tasker status` and the dashboard show: each schedule with its
      # last tick (from the database; nil before the first) and its next.
      def status(conn, config = TaskerCore.config, now: Time.now)
        list = schedules(config)
        return [] if list.empty?

        rows = if conn.exec("SELECT to_regclass('tasker_recurring_schedules') IS NOT NULL AS ok").first["ok"]
                 conn.exec(<<~SQL, [list.map(&:name)]).to_h { |r| [r["name"], r] }
                   SELECT name, extract(epoch FROM last_tick_at)::float8 AS last_tick_at, last_task_id
                     FROM tasker_recurring_schedules WHERE name = ANY($1::text[])
                 SQL
               else {}
               end
        list.map do |s|
          row = rows[s.name] || {}
          { "name" => s.name, "task" => "#{s.namespace}/#{s.task}", "cron" => s.expression, "backfill" => s.backfill,
            "last_tick_at" => row["last_tick_at"] && Time.at(row["last_tick_at"]).utc.iso8601,
            "last_task_id" => row["last_task_id"], "next_tick_at" => s.next_tick(now).utc.iso8601 }
        end
      end

      def parse_cron(text)
        require "fugit"
        Fugit::Cron.parse(text) if text.is_a?(String)
      end

      private

      def entry_problem(entry, i)
        return ["[#{i}]", "expected a mapping (name, task, cron, ...), got #{entry.inspect} (#{entry.class})"] unless entry.is_a?(Hash)

        e = entry.to_h { |k, v| [k.to_s, v] }
        where = "[#{i}]#{" (#{e['name']})" if e['name'].is_a?(String)}"
        unknown = e.keys - KEYS
        return ["#{where}.#{unknown.first}", "unknown key (known: #{KEYS.join(', ')})"] unless unknown.empty?

        missing = REQUIRED - e.keys
        return ["#{where}.#{missing.first}", "missing"] unless missing.empty?

        problem = value_problem(e)
        problem && ["#{where}.#{problem[0]}", problem[1]]
      end

      def value_problem(e)
        checks = {
          "name" => [->(v) { v.is_a?(String) && v.match?(NAME) }, "a name of 1-100 letters, digits, _ . or -"],
          "task" => [->(v) { v.is_a?(String) && !v.empty? }, "a task template name"],
          "namespace" => [->(v) { v.nil? || (v.is_a?(String) && !v.empty?) }, "a namespace"],
          "version" => [->(v) { v.nil? || (v.is_a?(String) && !v.empty?) || v.is_a?(Numeric) }, "a template version"],
          "cron" => [->(v) { !parse_cron(v).nil? }, "a cron expression such as #{CRON_EXAMPLE}"],
          "context" => [->(v) { v.nil? || v.is_a?(Hash) }, "a mapping (the task's context)"],
          "queue" => [->(v) { v.nil? || Queues.name?(v) }, "a queue name (1 to 63 of A-Z a-z 0-9 _ . : -)"],
          "priority" => [->(v) { v.nil? || Queues.priority?(v) },
                         "an Integer between #{Queues::PRIORITY.min} and #{Queues::PRIORITY.max} (higher runs first)"],
          "backfill" => [->(v) { [true, false, nil].include?(v) }, "true or false"]
        }
        checks.each do |key, (ok, expected)|
          next if !e.key?(key) || ok.call(e[key])

          return [key, "expected #{expected}, got #{e[key].inspect} (#{e[key].class})"]
        end
        nil
      end
    end

    # The recurring tasks of an orchestrator process: a thread beside the
    # native loop. It reads the schedules' last ticks once when it starts
    # (for `backfill: true`), then per wake-up creates the ticks that are
    # due (one create_tasks statement, one update of their rows) and sleeps
    # until the next. Database errors are logged and the same ticks tried
    # again (their identity keys make that safe).
    class Scheduler
      include Internal::BackgroundThread

      RETRY_S = 2.0
      # Longest sleep: the clock is read again at least this often.
      MAX_SLEEP_S = 60.0
      LAST_SQL = <<~SQL
        SELECT name, extract(epoch FROM last_tick_at)::float8 AS last_tick_at
          FROM tasker_recurring_schedules WHERE name = ANY($1::text[])
      SQL
      RECORD_SQL = <<~SQL
        INSERT INTO tasker_recurring_schedules AS r (name, last_tick_at, last_task_id)
        SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[])
        ON CONFLICT (name) DO UPDATE SET last_tick_at = excluded.last_tick_at, last_task_id = excluded.last_task_id,
                                         updated_at = now()
         WHERE r.last_tick_at < excluded.last_tick_at
      SQL

      # nil when the configuration has no recurring tasks. Checks every
      # schedule's template (ConfigurationError naming the file, the entry
      # and the key).
      def self.from_config(config = TaskerCore.config, templates: nil, logger: TaskerCore.logger)
        schedules = Recurring.schedules(config)
        return nil if schedules.empty?

        Recurring.check_templates!(schedules, templates || TaskerCore.task_templates, config.path)
        new(schedules, logger: logger)
      end

      attr_reader :schedules

      # Tasks are created with TaskerCore.create_tasks (its templates and store).
      def initialize(schedules, logger: TaskerCore.logger)
        @schedules = schedules
        @logger = logger
        init_background_thread
      end

      def start
        return self if running?

        @started_at = Time.now
        super
        @logger.info("tasker recurring: #{@schedules.size} schedule(s): " +
                     @schedules.map { |s| "#{s.name} (#{s.expression}) next #{s.next_tick(@started_at).utc.iso8601}" }.join(", "))
        self
      end

      private

      def thread_name = "tasker_core recurring"

      def run
        cursors = nil
        loop do
          cursors ||= initial_cursors
          break if pause(cursors ? tick(cursors) : RETRY_S)
        end
      end

      # { name => the latest tick handled }: the start for every schedule,
      # the recorded last tick for one with backfill: true. nil when the
      # database could not be read (tried again).
      def initial_cursors
        start = @started_at
        backfill = @schedules.select(&:backfill)
        last = backfill.empty? ? {} : Store.with_connection(idempotent: true) { |c| c.exec(LAST_SQL, [backfill.map(&:name)]).to_h { |r| [r["name"], Time.at(r["last_tick_at"])] } }
        @schedules.to_h { |s| [s.name, s.backfill && last[s.name] && last[s.name] < start ? last[s.name] : start] }
      rescue StandardError => e
        @logger.warn("tasker recurring: cannot read the last ticks (#{e.class}: #{e.message}); trying again in #{RETRY_S}s")
        nil
      end

      # Creates what is due; -> seconds until the next tick (or a retry).
      def tick(cursors)
        now = Time.now
        due = @schedules.flat_map do |s|
          ticks, skipped = s.ticks(cursors[s.name], now)
          if skipped
            @logger.warn("tasker recurring: #{s.name}: ticks before #{ticks.first.utc.iso8601} skipped " \
                         "(at most the latest #{MAX_TICKS} are created at once)")
          end
          ticks.map { |t| [s, t] }
        end
        create(due, cursors) unless due.empty?
        next_at = @schedules.map { |s| s.next_tick(cursors[s.name]) }.min
        (next_at - Time.now).clamp(0.0, MAX_SLEEP_S)
      rescue StandardError => e
        @logger.warn("tasker recurring: creating #{due&.size} due task(s) failed (#{e.class}: #{e.message}); " \
                     "trying again in #{RETRY_S}s")
        RETRY_S
      end

      def create(due, cursors)
        ids = TaskerCore.create_tasks(due.map { |s, t| s.entry(t) })
        latest = due.each_with_index.to_h { |(s, t), i| [s.name, [t, ids[i]]] }
        Store.with_connection(idempotent: true) do |c|
          c.exec(RECORD_SQL, [latest.keys, latest.values.map { |t, _| t.utc.iso8601(6) }, latest.values.map(&:last)])
        end
        latest.each { |name, (t, _)| cursors[name] = t }
        due.each_with_index do |(s, t), i|
          @logger.debug("tasker recurring: #{s.name}: tick #{t.utc.iso8601} -> task #{ids[i]}")
        end
      end
    end
  end
end
