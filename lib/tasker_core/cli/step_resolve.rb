# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker step resolve ID --output JSON
    class StepResolve < Command
      ARGUMENTS = "ID"
      ARITY = 1
      DESCRIPTION = <<~TEXT.chomp
        Marks an unfinished or failed step as resolved by hand, with the given output:
        its dependents run as if it had completed. A result that arrives later is ignored.
      TEXT

      private

      def define_options(o)
        o.on("--output JSON", "the step's output, a JSON object (required)") { |v| @options[:output] = v }
      end

      def call(args)
        id = integer_arg(args.first, "ID")
        raise UsageError, "--output JSON is required" unless @options.key?(:output)

        output = json_object(@options[:output], "--output")
        use_database!
        return out.puts("step #{id} resolved") || EXIT_OK if Tasks.resolve_step(id, output: output)

        state = Store.with_connection { |c| c.exec("SELECT state FROM tasker_workflow_steps WHERE id = $1", [id]).first }
        raise Error, "there is no step #{id}" unless state

        raise Error, "step #{id} was not resolved: it is already #{state['state']}"
      end
    end
  end
end
