# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker step retry ID
    class StepRetry < Command
      ARGUMENTS = "ID"
      ARITY = 1
      DESCRIPTION = "Puts a step that is in error back to pending (its failure count reset); its task resumes."

      private

      def call(args)
        id = integer_arg(args.first, "ID")
        use_database!
        return out.puts("step #{id} will be retried") || EXIT_OK if Tasks.retry_step(id)

        state = step_state(id) or raise Error, "there is no step #{id}"
        raise Error, "step #{id} was not retried: only a step in error can be, and it is #{state}"
      end

      def step_state(id)
        Store.with_connection do |c|
          row = c.exec(<<~SQL, [id]).first
            SELECT s.state, t.state AS task_state FROM tasker_workflow_steps s JOIN tasker_tasks t ON t.id = s.task_id
             WHERE s.id = $1
          SQL
          row && (row["task_state"] == "cancelled" ? "#{row['state']} in a cancelled task" : row["state"])
        end
      end
    end
  end
end
