# frozen_string_literal: true

require "json"
require_relative "payload"
require_relative "queues"
require_relative "store"
require_relative "task_template_registry"

module TaskerCore
  # The Ruby task API: create tasks from templates, read them, wait for
  # them, and steer them by hand. Every call is one round trip to a SQL
  # function of the store (db/migrate), shared with the orchestration loop.
  # Payloads (context, handler_config, outputs, errors) are msgpack, through
  # TaskerCore::Codec.
  module Tasks
    FINISHED = %w[complete error cancelled].freeze
    WAIT_INTERVAL = 0.05

    TASK_SQL = <<~SQL
      SELECT id, namespace, name, version, state, identity_key, context, step_count, remaining_steps,
             extract(epoch FROM created_at)::float8 AS created_at, extract(epoch FROM updated_at)::float8 AS updated_at,
             extract(epoch FROM finished_at)::float8 AS finished_at
        FROM tasker_tasks WHERE id = $1
    SQL
    STEPS_SQL = <<~SQL
      SELECT s.id, s.name, s.handler, s.queue, s.priority, s.concurrency_key, s.concurrency_limit, s.state, s.attempts, s.failures, s.lost_attempts, s.max_attempts, s.pending_parents,
             s.output, s.last_error,
             ARRAY(SELECT p.name FROM tasker_workflow_step_edges e JOIN tasker_workflow_steps p ON p.id = e.from_step_id
                    WHERE e.to_step_id = s.id ORDER BY p.name) AS depends_on,
             extract(epoch FROM s.created_at)::float8 AS created_at,
             extract(epoch FROM s.updated_at)::float8 AS updated_at,
             extract(epoch FROM s.next_attempt_at)::float8 AS next_attempt_at,
             extract(epoch FROM s.last_attempt_at)::float8 AS last_attempt_at,
             extract(epoch FROM s.last_failure_at)::float8 AS last_failure_at,
             extract(epoch FROM s.finished_at)::float8 AS finished_at
        FROM tasker_workflow_steps s WHERE s.task_id = $1 ORDER BY s.id
    SQL

    # tasker_create_tasks_v2 (db/migrate/0011) for one template: its 23
    # parameters ($n..$n+22).
    CREATE_TYPES = %w[text text text jsonb bytea[] text[] text[] text[] bytea[] int[] boolean[] int[] int[] int[]
                      float8[] text[] text[] text[] int[] text[] int[] timestamptz[] float8[]].freeze
    def self.create_call(first)
      args = CREATE_TYPES.each_with_index.map { |t, i| "$#{first + i}::#{t}" }
      "tasker_create_tasks_v2(#{args.join(', ')})"
    end

    class << self
      # create_tasks with one entry.
      def create_task(name:, namespace: "default", version: nil, context: {}, identity_key: nil, queue: nil,
                      priority: nil, run_at: nil, delay: nil, templates: TaskerCore.task_templates)
        row = checked_row({ name: name, namespace: namespace, version: version, context: context,
                            identity_key: identity_key, queue: queue, priority: priority, run_at: run_at,
                            delay: delay }, 0, templates)
        ids = insert_shared([row])
        (ids.equal?(ActiveRecordDatabase::NONE) ? insert([row]) : ids).first
      end

      # Many tasks in one statement (one round trip, one commit): each
      # entry a Hash of create_task's keywords. Every context is checked
      # (schema, depth, size) before anything is written; the first refusal
      # raises and nothing is created. Returns the ids in the order given; an
      # identity_key already taken (also earlier in the same list) returns
      # the existing task's id.
      def create_tasks(entries, templates: TaskerCore.task_templates)
        return [] if entries.empty?

        rows = entries.each_with_index.map { |e, i| checked_row(e.to_h, i, templates) }
        ids = insert_shared(rows)
        ids.equal?(ActiveRecordDatabase::NONE) ? insert(rows) : ids
      end

      # rows (Row) created on the
      # process's pool in one statement; their ids in order. With an
      # identity_key on every row a lost connection runs it once more (a
      # repeat returns the tasks already created).
      def insert(rows)
        sql, params = create_statement(rows)
        ids_of(rows, Store.with_connection(idempotent: rows.all? { |r| !r.identity_key.nil? }) { |c| c.exec(sql, params) })
      end

      # A Hash describing the task and each of its steps, or nil when there
      # is no such task.
      def task(id)
        Store.with_connection(idempotent: true) do |c|
          t = c.exec(TASK_SQL, [Integer(id)]).first or return nil
          steps = c.exec(STEPS_SQL, [t["id"]])
          task_hash(t, steps)
        end
      end

      # Blocks (interruptibly) until the task is complete, error or
      # cancelled; returns #task. Raises WaitTimeoutError after timeout
      # seconds (nil waits forever).
      def wait_for(id, timeout:)
        deadline = timeout && Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
        loop do
          state = Store.with_connection(idempotent: true) do |c|
            c.exec("SELECT state FROM tasker_tasks WHERE id = $1", [Integer(id)]).first&.fetch("state")
          end
          raise Error, "no task #{id}" unless state
          return task(id) if FINISHED.include?(state)
          if deadline && Process.clock_gettime(Process::CLOCK_MONOTONIC) >= deadline
            raise WaitTimeoutError, "task #{id} still #{state} after #{timeout}s"
          end

          sleep WAIT_INTERVAL
        end
      end

      def cancel_task(id) = call_bool("SELECT tasker_cancel_task($1) AS ok", [Integer(id)])
      def retry_step(step_id) = call_bool("SELECT tasker_retry_step($1) AS ok", [Integer(step_id)])

      def resolve_step(step_id, output:)
        call_bool("SELECT tasker_resolve_step($1, $2::bytea) AS ok", [Integer(step_id), Codec.pack(output)])
      end

      ENTRY_KEYS = %i[name namespace version context identity_key queue priority run_at delay].freeze

      # One task to create: its template, packed context, identity key, the
      # placement of each step (TaskTemplate#placement) and when it may start
      # (run_at, a Time, or delay, seconds from the database's now; both nil:
      # at once).
      Row = Struct.new(:template, :context, :identity_key, :placement, :run_at, :delay)

      private

      def checked_row(entry, index, templates)
        unknown = entry.keys - ENTRY_KEYS
        raise ArgumentError, "create_tasks entry #{index}: unknown keys #{unknown.inspect}" unless unknown.empty?

        template = templates.find(name: entry.fetch(:name), namespace: entry.fetch(:namespace, "default"),
                                  version: entry[:version])
        context = entry.fetch(:context, {})
        template.validate_context!(context)
        queue, priority, run_at, delay = entry.values_at(:queue, :priority, :run_at, :delay)
        queue = queue.to_s if queue.is_a?(Symbol)
        invalid!(template, "queue", Queues.name_problem(queue)) unless queue.nil? || Queues.name?(queue)
        invalid!(template, "priority", Queues.priority_problem(priority)) unless priority.nil? || Queues.priority?(priority)
        run_at = start_time(template, run_at, delay)
        Row.new(template, Payload.pack_checked(context, what: "the context of a #{template.full_name} task"),
                entry[:identity_key]&.to_s, template.placement(context, queue: queue, priority: priority),
                run_at, delay && delay.to_f)
      end

      def start_time(template, run_at, delay)
        invalid!(template, "run_at", "give run_at or delay, not both") if run_at && delay
        if delay && !(delay.is_a?(Numeric) && delay.real? && delay.to_f.finite? && delay >= 0)
          invalid!(template, "delay", "expected a number of seconds >= 0, got #{delay.inspect}")
        end
        return nil if run_at.nil?

        run_at = run_at.to_time if defined?(DateTime) && run_at.is_a?(DateTime)
        invalid!(template, "run_at", "expected a Time, got #{run_at.inspect} (#{run_at.class})") unless run_at.is_a?(Time)
        run_at
      end

      def invalid!(template, key, problem)
        raise ValidationError, "create_task #{template.full_name}: #{key}: #{problem}"
      end

      # Inside an ActiveRecord transaction: on its connection, so the tasks
      # commit or roll back with it (ActiveRecordDatabase). Else NONE.
      def insert_shared(rows)
        result = ActiveRecordDatabase.with_shared_connection { |c| c.exec(*create_statement(rows)) }
        result.equal?(ActiveRecordDatabase::NONE) ? result : ids_of(rows, result)
      end

      def ids_of(rows, result)
        ids = Array.new(rows.size)
        result.each { |r| ids[Integer(r["i"])] = Integer(r["task_id"]) }
        ids
      end

      # One statement for all the rows (so one commit, and atomic without a
      # transaction): a tasker_create_tasks_v2 call per template, its rows
      # numbered back to their positions.
      def create_statement(rows)
        params = []
        parts = rows.each_with_index.group_by { |(r, _)| r.template }.map do |template, list|
          first = params.size + 1
          params.concat(template_params(template))
          tasks = list.map(&:first)
          params.insert(first + 3, tasks.map(&:context), tasks.map(&:identity_key))
          params.concat(task_params(tasks))
          "SELECT ('{#{list.map(&:last).join(',')}}'::int[])[c.ord] AS i, c.task_id " \
            "FROM #{Tasks.create_call(first)} WITH ORDINALITY AS c(task_id, created, ord)"
        end
        [parts.join(" UNION ALL "), params]
      end

      # tasker_create_tasks_v2's parameters for a template, less the
      # contexts and identity keys (positions 5 and 6) and the tasks' own.
      def template_params(template)
        steps = template.steps
        edges = steps.flat_map { |s| s.depends_on.map { |d| [d, s.name] } }
        [template.namespace, template.name, template.version, JSON.generate(template.definition),
         steps.map(&:name), steps.map(&:handler), steps.map { |s| Codec.pack(s.handler_config) },
         steps.map(&:timeout_ms), steps.map(&:retryable), steps.map(&:max_attempts),
         steps.map(&:backoff_base_ms), steps.map(&:backoff_cap_ms), steps.map(&:jitter),
         edges.map(&:first), edges.map(&:last)]
      end

      # The steps' queue, priority, concurrency key and limit: per step when
      # every task places its steps alike (the usual case: arrays one step
      # long), else per task and step (task by task, steps in template
      # order); per task run_at and delay, NULL when no task has one.
      def task_params(tasks)
        placed = tasks.map(&:placement).uniq.size == 1 ? tasks.first.placement : tasks.flat_map(&:placement)
        run_at = tasks.map { |t| t.run_at&.utc&.strftime("%Y-%m-%d %H:%M:%S.%6N+00") }
        delay = tasks.map(&:delay)
        [placed.map { |p| p[0] }, placed.map { |p| p[1] }, placed.map { |p| p[2] }, placed.map { |p| p[3] },
         (run_at if run_at.any?), (delay if delay.any?)]
      end

      def call_bool(sql, params)
        Store.with_connection { |c| c.exec(sql, params).first["ok"] }
      end

      def time(epoch) = epoch && Time.at(epoch).utc

      def unpack(bytes) = bytes && Codec.unpack(bytes)

      def task_hash(t, steps)
        {
          id: t["id"], namespace: t["namespace"], name: t["name"], version: t["version"],
          status: t["state"], identity_key: t["identity_key"], context: unpack(t["context"]),
          created_at: time(t["created_at"]), updated_at: time(t["updated_at"]), finished_at: time(t["finished_at"]),
          steps: steps.map do |s|
            {
              id: s["id"], name: s["name"], handler: s["handler"], queue: s["queue"], priority: s["priority"],
              concurrency_key: s["concurrency_key"], concurrency_limit: s["concurrency_limit"],
              state: s["state"], attempts: s["attempts"],
              failures: s["failures"], lost_attempts: s["lost_attempts"], max_attempts: s["max_attempts"],
              depends_on: s["depends_on"],
              pending_parents: s["pending_parents"], output: unpack(s["output"]), error: unpack(s["last_error"]),
              created_at: time(s["created_at"]), updated_at: time(s["updated_at"]),
              next_attempt_at: time(s["next_attempt_at"]), last_attempt_at: time(s["last_attempt_at"]),
              last_failure_at: time(s["last_failure_at"]), finished_at: time(s["finished_at"])
            }
          end
        }
      end
    end
  end

  class << self
    # Creates a task from a template; returns its id. The same identity_key
    # returns the existing task's id. See TaskerCore::Tasks.
    # queue: the queue of its steps that do not name one in the template
    # (instead of the template's); priority: -100..100, higher first (the
    # same rule); run_at: a Time, or delay: seconds: its steps become ready
    # no earlier. ValidationError naming the key for a bad value.
    def create_task(name:, namespace: "default", version: nil, context: {}, identity_key: nil, queue: nil,
                    priority: nil, run_at: nil, delay: nil)
      id = Tasks.create_task(name: name, namespace: namespace, version: version, context: context,
                             identity_key: identity_key, queue: queue, priority: priority, run_at: run_at,
                             delay: delay)
      if Instrumentation.listening?(:task_created)
        Instrumentation.instrument(:task_created, task_id: id, name: name.to_s, namespace: namespace.to_s,
                                                  version: version, identity_key: identity_key)
      end
      id
    end

    # Creates many tasks in one statement; returns their ids in the order
    # given. Each entry: { name:, namespace:, version:, context:, identity_key:,
    # queue:, priority:, run_at:, delay: } as create_task takes them. See TaskerCore::Tasks.create_tasks.
    def create_tasks(entries)
      ids = Tasks.create_tasks(entries)
      if Instrumentation.listening?(:task_created)
        entries.each_with_index do |e, i|
          e = e.to_h
          Instrumentation.instrument(:task_created, task_id: ids[i], name: e[:name].to_s,
                                                    namespace: e.fetch(:namespace, "default").to_s,
                                                    version: e[:version], identity_key: e[:identity_key])
        end
      end
      ids
    end

    def task(id) = Tasks.task(id)
    def wait_for(id, timeout:) = Tasks.wait_for(id, timeout: timeout)
    def cancel_task(id) = Tasks.cancel_task(id)
    def retry_step(step_id) = Tasks.retry_step(step_id)
    def resolve_step(step_id, output:) = Tasks.resolve_step(step_id, output: output)
  end
end
