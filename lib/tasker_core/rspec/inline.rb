# frozen_string_literal: true

module TaskerCore
  module RSpec
    # Runs tasks synchronously in this process: claims ready steps of the
    # task, whatever their queue, with tasker_claim_queued (the claim under
    # tasker_claim_steps_v4), calls their handlers here, and writes results with
    # tasker_apply_results, the very functions the orchestration loop calls,
    # so the state machine and the retry rules are the store's, not a copy.
    # No sockets. A retry's backoff is skipped (next_attempt_at is moved to
    # now) unless honor_backoff: true, so a spec does not sleep.
    class Inline
      OWNER = "tasker-inline"

      Result = Struct.new(:task_id, :task, :handler_calls, keyword_init: true) do
        def status = task[:status]
        def step(name) = task[:steps].find { |s| s[:name] == name.to_s }
      end

      def initialize(handlers: HandlerRegistry.default, honor_backoff: false, max_rounds: 1000)
        @registry = handlers
        @honor_backoff = honor_backoff
        @max_rounds = max_rounds
      end

      # Creates a task from a template and runs it to the end (complete,
      # error or cancelled). Returns a Result (its #task is TaskerCore.task).
      def run(name:, namespace: "default", version: nil, context: {}, templates: TaskerCore.task_templates)
        id = if templates.equal?(TaskerCore.task_templates) # the public call: task_created is emitted
               TaskerCore.create_task(name: name, namespace: namespace, version: version, context: context)
             else
               Tasks.create_task(name: name, namespace: namespace, version: version, context: context,
                                 templates: templates)
             end
        run_task(id)
      end

      # Runs the steps of an existing task until it finishes or nothing is runnable.
      def run_task(task_id)
        calls = 0
        @max_rounds.times do
          rows = Store.with_connection { |c| claim(c, task_id) }
          if rows.empty?
            break unless retry_pending?(task_id)

            next
          end
          calls += rows.size
          results = rows.map { |row| execute(row) }
          Store.with_connection { |c| apply(c, results) }
        end
        Result.new(task_id: task_id, task: TaskerCore.task(task_id), handler_calls: calls)
      end

      # One handler on one made-up step: returns its output or raises what it raised.
      def call_handler(handler, context: {}, dependency_results: {}, config: {}, name: "step", attempt: 1)
        step = { "step_id" => 0, "task_id" => 0, "step_name" => name.to_s, "handler" => handler.to_s,
                 "handler_config" => config, "attempt" => attempt, "timeout_ms" => 0,
                 "context" => context, "dependency_results" => dependency_results }
        @registry.handler_for(handler.to_s).call(*StepContext.from_wire(step))
      end

      private

      # Only this task's steps: other tasks in the database are left alone.
      def claim(conn, task_id)
        conn.transaction do
          conn.exec(<<~SQL, [task_id]) unless @honor_backoff
            UPDATE tasker_workflow_steps SET next_attempt_at = now()
             WHERE task_id = $1 AND state = 'pending' AND next_attempt_at > now()
          SQL
          # The queued claim, from the queues of the task's pending steps
          # and restricted to the task (p_task_id).
          conn.exec(<<~SQL, [OWNER, 1000, 60_000, task_id])
            SELECT c.* FROM (SELECT array_agg(DISTINCT s.queue) AS q FROM tasker_workflow_steps s
                              WHERE s.task_id = $4 AND s.state = 'pending') x
             CROSS JOIN LATERAL tasker_claim_queued($1, $3, 'in_progress', NULL, 0, $2, x.q,
                                                    array_fill($2::int, ARRAY[coalesce(cardinality(x.q), 0)]),
                                                    NULL, NULL, $4::bigint) c
          SQL
        end
      end

      def retry_pending?(task_id)
        return false unless @honor_backoff

        wait = Store.with_connection do |c|
          c.exec(<<~SQL, [task_id]).first["s"]
            SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 AS s FROM tasker_workflow_steps
             WHERE task_id = $1 AND state = 'pending' AND pending_parents = 0
          SQL
        end
        return false if wait.nil?

        sleep wait if wait.positive?
        true
      end

      def execute(row)
        step = {
          "step_id" => row["step_id"], "task_id" => row["task_id"], "step_name" => row["step_name"],
          "handler" => row["handler"], "handler_config" => unpack(row["handler_config"]) || {},
          "attempt" => row["attempt"], "timeout_ms" => row["timeout_ms"], "context" => unpack(row["context"]) || {},
          "dependency_results" => Array(row["dep_names"]).zip(Array(row["dep_outputs"]).map { |o| unpack(o) }).to_h
        }
        Instrumentation.instrument(:step_started, step_payload(step)) if Instrumentation.listening?(:step_started)
        output = @registry.handler_for(step["handler"]).call(*StepContext.from_wire(step, batch_id: "inline"))
        unless output.is_a?(Hash)
          raise TypeError, "handler #{step['handler']} returned #{output.class}, a step's output must be a Hash"
        end

        Instrumentation.instrument(:step_completed, step_payload(step)) if Instrumentation.listening?(:step_completed)
        { row: row, success: true, output: Codec.pack(output) }
      rescue Exception => e # rubocop:disable Lint/RescueException -- as the worker does
        raise if e.is_a?(Interrupt) || e.is_a?(SignalException) || e.is_a?(NoMemoryError)

        error = Protocol.error_from_exception(e)
        if Instrumentation.listening?(:step_failed)
          Instrumentation.instrument(:step_failed, step_payload(step).merge(error_class: error["class"],
                                                                            error_message: error["message"],
                                                                            retryable: error["retryable"]))
        end
        { row: row, success: false, error: error }
      end

      def step_payload(step)
        { step_id: step["step_id"], task_id: step["task_id"], step_name: step["step_name"], handler: step["handler"],
          attempt: step["attempt"], worker_id: "inline", batch_id: "inline" }
      end

      def apply(conn, results)
        conn.exec(<<~SQL, [
          SELECT * FROM tasker_apply_results($1::bigint[], $2::int[], $3::boolean[], $4::bytea[], $5::bytea[],
                                             $6::boolean[], $7::int[])
        SQL
          results.map { |r| r[:row]["step_id"] }, results.map { |r| r[:row]["attempt"] },
          results.map { |r| r[:success] }, results.map { |r| r[:output] },
          results.map { |r| r[:error] && Codec.pack(r[:error]) },
          results.map { |r| r[:error] ? r[:error]["retryable"] != false : true },
          results.map { |r| r[:error] && r[:error]["retry_after"] && (r[:error]["retry_after"] * 1000).round }
        ])
      end

      def unpack(bytes) = bytes && Codec.unpack(bytes)
    end
  end
end
