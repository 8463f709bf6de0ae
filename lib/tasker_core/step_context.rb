# frozen_string_literal: true

module TaskerCore
  # The three objects a step handler receives: #call(task, sequence, step).
  # They are built from one step of a batch message (docs/protocol.md).
  module StepContext
    # The task the step belongs to and its context (the task's input).
    Task = Struct.new(:id, :context, keyword_init: true)

    # What the step is and how it is to run.
    Step = Struct.new(:id, :name, :attempt, :handler, :handler_config, :timeout_ms, :batch_id,
                      keyword_init: true) do
      alias_method :config, :handler_config
    end

    # The outputs of the step's dependencies, by step name.
    class Sequence
      include Enumerable

      attr_reader :results

      def initialize(results)
        @results = results.freeze
      end

      def [](step_name)
        @results[step_name.to_s]
      end

      def fetch(step_name, *default, &block)
        @results.fetch(step_name.to_s, *default, &block)
      end

      def key?(step_name)
        @results.key?(step_name.to_s)
      end

      def each(&block)
        @results.each(&block)
      end

      def to_h
        @results.dup
      end
    end

    module_function

    # [task, sequence, step] for one step hash of a validated batch.
    def from_wire(step, batch_id: nil)
      [Task.new(id: step["task_id"], context: step["context"]),
       Sequence.new(step["dependency_results"]),
       Step.new(id: step["step_id"], name: step["step_name"], attempt: step["attempt"],
                handler: step["handler"], handler_config: step["handler_config"],
                timeout_ms: step["timeout_ms"], batch_id: batch_id)]
    end
  end
end
