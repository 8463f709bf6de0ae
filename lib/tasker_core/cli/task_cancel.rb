# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker task cancel ID
    class TaskCancel < Command
      ARGUMENTS = "ID"
      ARITY = 1
      DESCRIPTION = "Cancels an unfinished task and its unfinished steps; results that arrive later are ignored."

      private

      def call(args)
        id = integer_arg(args.first, "ID")
        use_database!
        return out.puts("task #{id} cancelled") || EXIT_OK if Tasks.cancel_task(id)

        task = Tasks.task(id) or raise Error, "there is no task #{id}"
        raise Error, "task #{id} was not cancelled: it is already #{task[:status]}"
      end
    end
  end
end
